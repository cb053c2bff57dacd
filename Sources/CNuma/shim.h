/* libnuma, from Debian's libnuma-dev (scripts/setup.sh installs it). */
#include <numa.h>
#include <numaif.h>

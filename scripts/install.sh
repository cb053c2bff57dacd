#!/usr/bin/env bash
# Installs the command-line tool and the C ABI: PREFIX/bin/phatgoose, PREFIX/include/phatgoose.h,
# PREFIX/lib/libphatgoose.so and PREFIX/lib/pkgconfig/phatgoose.pc, so a shell finds `phatgoose` when PREFIX/bin is on
# PATH and a C or C++ build finds the library with -lphatgoose (and -I/-L for a PREFIX the toolchain does not search).
#
#   bash scripts/install.sh [PREFIX]        PREFIX defaults to /usr/local
#
# Builds both first (swift build -c release) unless PHATGOOSE_NO_BUILD=1. SwiftPM names
# it libPhatgooseC.so (a product named `phatgoose` would collide with the executable); it carries no SONAME, so the
# installed file name is what programs record. It needs the Swift runtime libraries, which it finds through the
# RUNPATH of the toolchain that built it. Runs ldconfig when run as root, so the dynamic linker's cache knows the
# library when PREFIX/lib is one of its directories (/usr/local/lib, /usr/lib, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
prefix="${1:-/usr/local}"
case "$prefix" in
  /*) ;;
  *) prefix="$PWD/$prefix" ;;
esac

if [ "${PHATGOOSE_NO_BUILD:-0}" != 1 ]; then
  swift build -c release
fi
library="$(swift build -c release --show-bin-path)/libPhatgooseC.so"
tool="$(swift build -c release --show-bin-path)/phatgoose"
[ -f "$library" ] || { echo "install: $library: expected a built library, found none (build with swift build -c release)" >&2; exit 1; }
[ -f "$tool" ] || { echo "install: $tool: expected a built tool, found none (build with swift build -c release)" >&2; exit 1; }

install -d "$prefix/bin" "$prefix/include" "$prefix/lib/pkgconfig"
install -m 755 "$tool" "$prefix/bin/.phatgoose.new"
mv -f "$prefix/bin/.phatgoose.new" "$prefix/bin/phatgoose"
install -m 644 include/phatgoose.h "$prefix/include/phatgoose.h"
# Write beside the target, then rename: a running program that has the old library mapped keeps its copy.
install -m 755 "$library" "$prefix/lib/.libphatgoose.so.new"
mv -f "$prefix/lib/.libphatgoose.so.new" "$prefix/lib/libphatgoose.so"
version="$(sed -n 's/^#define PHATGOOSE_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$/\2/p' include/phatgoose.h | paste -sd. -)"
cat > "$prefix/lib/pkgconfig/phatgoose.pc" <<PC
prefix=$prefix
includedir=\${prefix}/include
libdir=\${prefix}/lib

Name: phatgoose
Description: PHATGOOSE mixture-of-LoRA-experts routing on CPUs (C ABI)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lphatgoose
PC

if [ "$(id -u)" = 0 ] && command -v ldconfig >/dev/null; then
  ldconfig
fi
echo "installed phatgoose $version: $prefix/bin/phatgoose, $prefix/include/phatgoose.h, $prefix/lib/libphatgoose.so"

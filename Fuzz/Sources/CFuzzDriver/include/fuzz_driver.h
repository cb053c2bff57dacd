#ifndef PHATGOOSE_FUZZ_DRIVER_H
#define PHATGOOSE_FUZZ_DRIVER_H
#include <stddef.h>
#include <stdint.h>
/* libFuzzer's entry for programs that have their own main (provided by -sanitize=fuzzer's runtime). */
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
#endif

/*
 * Internal to libphatgoose: what the Swift implementation (target PhatgooseC) needs from C beyond phatgoose.h.
 * Not installed.
 */
#ifndef PHATGOOSE_INTERNAL_H
#define PHATGOOSE_INTERNAL_H

#include "phatgoose.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Stores a copy of `message` as the calling thread's last error (phatgoose_last_error_message). */
__attribute__((visibility("hidden"))) void pg_abi_set_last_error(const char *message);

#ifdef __cplusplus
}
#endif

#endif /* PHATGOOSE_INTERNAL_H */

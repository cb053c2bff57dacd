// The parts of the C ABI that are plain C: versions, status names and the per-thread error message. Everything else
// is implemented in Swift (target PhatgooseC) with `@c @implementation`, which the compiler checks against
// phatgoose.h just as it checks these definitions.
#include "phatgoose_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define PG_STRINGIFY_(x) #x
#define PG_STRINGIFY(x) PG_STRINGIFY_(x)

const char *phatgoose_version(void) {
    return PG_STRINGIFY(PHATGOOSE_VERSION_MAJOR) "." PG_STRINGIFY(PHATGOOSE_VERSION_MINOR) "." PG_STRINGIFY(PHATGOOSE_VERSION_PATCH);
}

uint32_t phatgoose_abi_version(void) { return PHATGOOSE_ABI_VERSION; }

const char *phatgoose_status_name(phatgoose_status status) {
    switch (status) {
    case PHATGOOSE_STATUS_OK: return "ok";
    case PHATGOOSE_STATUS_INVALID_ARGUMENT: return "invalid-argument";
    case PHATGOOSE_STATUS_INVALID_HANDLE: return "invalid-handle";
    case PHATGOOSE_STATUS_SHAPE: return "shape";
    case PHATGOOSE_STATUS_NOT_FOUND: return "not-found";
    case PHATGOOSE_STATUS_IO: return "io";
    case PHATGOOSE_STATUS_LIBRARY: return "library";
    case PHATGOOSE_STATUS_OVERLOADED: return "overloaded";
    case PHATGOOSE_STATUS_MEMORY_CAP: return "memory-cap";
    case PHATGOOSE_STATUS_SHUT_DOWN: return "shut-down";
    case PHATGOOSE_STATUS_BUFFER_TOO_SMALL: return "buffer-too-small";
    case PHATGOOSE_STATUS_INTERNAL: return "internal";
    case PHATGOOSE_STATUS_NON_FINITE_INPUT: return "non-finite-input";
    case PHATGOOSE_STATUS_UNAVAILABLE: return "unavailable";
    case PHATGOOSE_STATUS_TIMEOUT: return "timeout";
    }
    return "unknown";
}

// The last error of each thread: a heap copy behind a pthread key whose destructor frees it when the thread ends.
// A key rather than _Thread_local storage, so a library loaded with dlopen (Python's ctypes) never competes for
// the static TLS block.
static pthread_once_t error_key_once = PTHREAD_ONCE_INIT;
static pthread_key_t error_key;
static int error_key_ready;

static void make_error_key(void) { error_key_ready = pthread_key_create(&error_key, free) == 0; }

void pg_abi_set_last_error(const char *message) {
    pthread_once(&error_key_once, make_error_key);
    if (!error_key_ready || message == NULL) return;
    size_t length = strlen(message);
    char *copy = malloc(length + 1);
    if (copy == NULL) return;  // keep the previous message rather than fail while reporting a failure
    memcpy(copy, message, length + 1);
    char *previous = pthread_getspecific(error_key);
    if (pthread_setspecific(error_key, copy) != 0) {
        free(copy);
        return;
    }
    free(previous);
}

const char *phatgoose_last_error_message(void) {
    pthread_once(&error_key_once, make_error_key);
    if (!error_key_ready) return "";
    const char *message = pthread_getspecific(error_key);
    return message != NULL ? message : "";
}

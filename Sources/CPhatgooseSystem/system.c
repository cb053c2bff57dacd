/* Everything else in this module is static inline in the header; this file holds the cleanup registry, which needs
 * process-wide state and a signal handler. */
#include "phatgoose_system.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

/* Slots hold malloc'd copies: a kind byte ('f' file, 'd' directory) followed by the path. A slot is claimed and
 * cleared with atomic operations, so registration from many threads needs no lock; the signal handler only loads
 * slots, unlinks and rmdirs, which are async-signal-safe. */
#define PG_CLEANUP_SLOTS 8192
static char *pg_cleanup_paths[PG_CLEANUP_SLOTS];
static int pg_cleanup_running;

int pg_cleanup_register(const char *path, int is_directory) {
    size_t n = strlen(path);
    char *copy = malloc(n + 2);
    if (!copy) return -1;
    copy[0] = is_directory ? 'd' : 'f';
    memcpy(copy + 1, path, n + 1);
    for (int slot = 0; slot < PG_CLEANUP_SLOTS; slot++) {
        char *expected = NULL;
        if (__atomic_load_n(&pg_cleanup_paths[slot], __ATOMIC_SEQ_CST) != NULL) continue;
        if (__atomic_compare_exchange_n(&pg_cleanup_paths[slot], &expected, copy, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            return slot;
        }
    }
    free(copy);
    return -1;
}

void pg_cleanup_unregister(int slot) {
    if (slot < 0 || slot >= PG_CLEANUP_SLOTS) return;
    char *path = __atomic_exchange_n(&pg_cleanup_paths[slot], NULL, __ATOMIC_SEQ_CST);
    /* Once the handler runs it may be reading any slot: leave its path alone (the process is ending anyway). */
    if (path && !__atomic_load_n(&pg_cleanup_running, __ATOMIC_SEQ_CST)) free(path);
}

/* Creation and registration with the cleanup signals blocked, so that no signal can land between the two and leave
 * an unregistered file behind. */
static void pg_cleanup_block(sigset_t *saved) {
    sigset_t blocked;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGHUP);
    sigaddset(&blocked, SIGQUIT);
    pthread_sigmask(SIG_BLOCK, &blocked, saved);
}

int pg_cleanup_mkstemp(char *template_path, int *slot) {
    sigset_t saved;
    pg_cleanup_block(&saved);
    int fd = mkstemp(template_path);
    int saved_errno = errno;
    *slot = fd >= 0 ? pg_cleanup_register(template_path, 0) : -1;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    errno = saved_errno;
    return fd;
}

char *pg_cleanup_mkdtemp(char *template_path, int *slot) {
    sigset_t saved;
    pg_cleanup_block(&saved);
    char *made = mkdtemp(template_path);
    int saved_errno = errno;
    *slot = made ? pg_cleanup_register(template_path, 1) : -1;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    errno = saved_errno;
    return made;
}

static void pg_cleanup_remove_all(void) {
    __atomic_store_n(&pg_cleanup_running, 1, __ATOMIC_SEQ_CST);
    /* Files first, then directories from the most recently registered (innermost) outwards. */
    for (int slot = 0; slot < PG_CLEANUP_SLOTS; slot++) {
        char *path = __atomic_load_n(&pg_cleanup_paths[slot], __ATOMIC_SEQ_CST);
        if (path && path[0] == 'f') unlink(path + 1);
    }
    for (int slot = PG_CLEANUP_SLOTS - 1; slot >= 0; slot--) {
        char *path = __atomic_load_n(&pg_cleanup_paths[slot], __ATOMIC_SEQ_CST);
        if (path && path[0] == 'd') rmdir(path + 1);
    }
}

static void pg_cleanup_on_signal(int signal_number) {
    pg_cleanup_remove_all();
    /* Die of the same signal, so the parent sees how the process ended (exit status 128 + n in a shell). */
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = SIG_DFL;
    sigemptyset(&action.sa_mask);
    sigaction(signal_number, &action, NULL);
    raise(signal_number);
}

int pg_cleanup_install_signal_handlers(void) {
    static const int signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = pg_cleanup_on_signal;
    sigfillset(&action.sa_mask);
    sigset_t unblock;
    sigemptyset(&unblock);
    for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++) {
        /* A signal ignored at start (nohup, a shell's background job) stays ignored: it interrupts nothing. */
        struct sigaction previous;
        if (sigaction(signals[i], NULL, &previous) != 0) return -1;
        if (previous.sa_handler == SIG_IGN) continue;
        if (sigaction(signals[i], &action, NULL) != 0) return -1;
        sigaddset(&unblock, signals[i]);
    }
    /* A mask inherited from the parent (some process launchers block signals in the threads that spawn) would hold
     * the signal until the write is done: a tool that can be interrupted must receive it. */
    return pthread_sigmask(SIG_UNBLOCK, &unblock, NULL) == 0 ? 0 : -1;
}

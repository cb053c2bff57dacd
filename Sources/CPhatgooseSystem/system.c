/* Everything else in this module is static inline in the header; this file holds the cleanup registry, which needs
 * process-wide state and a signal handler, and the two readings whose system headers would clash with the Glibc
 * module if included from the header (the thread's preemption count, the machine's runnable threads). */
#include "phatgoose_system.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

int pg_runnable_threads(void) {
#if defined(__linux__)
    /* "0.50 0.40 0.30 RUNNING/TOTAL LASTPID": RUNNING counts every runnable thread of the machine, the reader too. */
    char text[128];
    int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0) return -1;
    text[n] = 0;
    int fields = 0, running = -1;
    for (char *p = text; *p; p++) {
        if (*p == ' ') {
            fields++;
            if (fields == 3) {
                running = (int)strtol(p + 1, NULL, 10);
                break;
            }
        }
    }
    return running;
#else
    return -1;
#endif
}

uint64_t pg_thread_involuntary_switches(void) {
#if defined(__linux__) && defined(RUSAGE_THREAD)
    struct rusage usage;
    if (getrusage(RUSAGE_THREAD, &usage) != 0) return 0;
    return (uint64_t)usage.ru_nivcsw;
#else
    return 0;
#endif
}

/* Slots hold malloc'd copies: a kind byte ('f' a file, 't' a directory tree) followed by the path. A slot is claimed
 * and cleared with atomic operations, so registration from many threads needs no lock; the signal handler only
 * loads slots and calls unlink, openat, getdents64, unlinkat and close, which are async-signal-safe. Callers
 * register a path before creating it, so no signal can find a file that is not yet registered. */
#define PG_CLEANUP_SLOTS 8192
static char *pg_cleanup_paths[PG_CLEANUP_SLOTS];
static int pg_cleanup_running;

int pg_cleanup_register(const char *path, int is_directory) {
    if (__atomic_load_n(&pg_cleanup_running, __ATOMIC_SEQ_CST)) return -1;  /* the process is going: create nothing */
    size_t n = strlen(path);
    char *copy = malloc(n + 2);
    if (!copy) return -1;
    copy[0] = is_directory ? 't' : 'f';
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

#if defined(__linux__)
struct pg_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Empties the directory open as fd, depth-first, without following symbolic links; depth bounds the recursion (the
 * trees registered here are a library: three levels). Then closes fd. */
static void pg_cleanup_empty(int fd, int depth) {
    char buffer[4096];
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buffer, sizeof buffer);
        if (n <= 0) break;
        int removed = 0;
        for (long at = 0; at < n;) {
            struct pg_dirent64 *entry = (struct pg_dirent64 *)(buffer + at);
            at += entry->d_reclen;
            const char *name = entry->d_name;
            if (name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0))) continue;
            if (unlinkat(fd, name, 0) == 0) { removed = 1; continue; }
            if (depth > 0) {
                int child = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (child >= 0) pg_cleanup_empty(child, depth - 1);
            }
            if (unlinkat(fd, name, AT_REMOVEDIR) == 0) removed = 1;
        }
        /* Entries were removed while reading: start again from the top until a pass removes nothing. */
        if (removed) lseek(fd, 0, SEEK_SET);
        else break;
    }
    close(fd);
}
#endif

static void pg_cleanup_remove_all(void) {
    __atomic_store_n(&pg_cleanup_running, 1, __ATOMIC_SEQ_CST);
    for (int slot = 0; slot < PG_CLEANUP_SLOTS; slot++) {
        char *path = __atomic_load_n(&pg_cleanup_paths[slot], __ATOMIC_SEQ_CST);
        if (!path) continue;
        if (path[0] == 'f') {
            unlink(path + 1);
        } else {
#if defined(__linux__)
            int fd = open(path + 1, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (fd >= 0) pg_cleanup_empty(fd, 8);
#endif
            rmdir(path + 1);
        }
    }
}

/* The signals that end the process and the actions they had before; crashes too, so that a fault in the middle of a
 * write (a mapped input truncated under us: SIGBUS) leaves nothing behind either. */
static const int pg_cleanup_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGSEGV, SIGBUS, SIGILL, SIGABRT, SIGFPE, SIGTRAP};
#define PG_CLEANUP_SIGNAL_COUNT (sizeof pg_cleanup_signals / sizeof pg_cleanup_signals[0])
static struct sigaction pg_cleanup_previous[PG_CLEANUP_SIGNAL_COUNT];

static void pg_cleanup_on_signal(int signal_number) {
    pg_cleanup_remove_all();
    /* Hand the signal to what was there before (the default: die of it, so the parent sees how the process ended;
     * or the Swift runtime's crash reporter). */
    for (size_t i = 0; i < PG_CLEANUP_SIGNAL_COUNT; i++) {
        if (pg_cleanup_signals[i] == signal_number) sigaction(signal_number, &pg_cleanup_previous[i], NULL);
    }
    raise(signal_number);
}

int pg_cleanup_install_signal_handlers(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = pg_cleanup_on_signal;
    action.sa_flags = SA_RESETHAND;
    sigfillset(&action.sa_mask);
    sigset_t unblock;
    sigemptyset(&unblock);
    for (size_t i = 0; i < PG_CLEANUP_SIGNAL_COUNT; i++) {
        int signal_number = pg_cleanup_signals[i];
        if (sigaction(signal_number, NULL, &pg_cleanup_previous[i]) != 0) return -1;
        /* A signal ignored at start (nohup, a shell's background job) stays ignored: it interrupts nothing. */
        if (pg_cleanup_previous[i].sa_handler == SIG_IGN) continue;
        if (sigaction(signal_number, &action, NULL) != 0) return -1;
        sigaddset(&unblock, signal_number);
    }
    /* A mask inherited from the parent (some process launchers block signals in the threads that spawn) would hold
     * the signal until the write is done: a tool that can be interrupted must receive it. */
    return pthread_sigmask(SIG_UNBLOCK, &unblock, NULL) == 0 ? 0 : -1;
}

void pg_cleanup_block_signals_in_this_thread(void) {
    sigset_t blocked;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGHUP);
    sigaddset(&blocked, SIGQUIT);
    pthread_sigmask(SIG_BLOCK, &blocked, NULL);
}

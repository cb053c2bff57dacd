/* Small static inline wrappers for what Swift cannot reach directly: futex, CPU affinity, thread names, page
 * location queries, and a CPU pause hint. Linux only; on other systems the calls report failure. */
#ifndef PHATGOOSE_SYSTEM_H
#define PHATGOOSE_SYSTEM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#include <time.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

/* Sleeps while *word == expected (or until woken). Returns 0, or -1 with errno (EAGAIN when *word != expected). */
static inline int pg_futex_wait(uint32_t *word, uint32_t expected) {
#if defined(__linux__)
    return (int)syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
#else
    (void)word; (void)expected; errno = ENOSYS; return -1;
#endif
}

/* Wakes up to count sleepers on word. */
static inline int pg_futex_wake(uint32_t *word, int count) {
#if defined(__linux__)
    return (int)syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
#else
    (void)word; (void)count; errno = ENOSYS; return -1;
#endif
}

static inline uint32_t pg_atomic_load_u32(uint32_t *word) { return __atomic_load_n(word, __ATOMIC_SEQ_CST); }
static inline void pg_atomic_store_u32(uint32_t *word, uint32_t value) { __atomic_store_n(word, value, __ATOMIC_SEQ_CST); }
/* Sets *word to desired if it holds expected; returns nonzero when it did. */
static inline int pg_atomic_cas_u32(uint32_t *word, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(word, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* Sequentially consistent operations on a shared int64 (work-queue cursors). */
static inline int64_t pg_atomic_fetch_add_i64(int64_t *p, int64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int64_t pg_atomic_load_i64(int64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void pg_atomic_store_i64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

/* Monotonic nanoseconds. */
static inline uint64_t pg_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* How many times the calling thread has been preempted (involuntary context switches), or 0 where unknown. In
 * system.c: <sys/resource.h> under _GNU_SOURCE would clash with the Glibc module's view of it. */
uint64_t pg_thread_involuntary_switches(void);

/* The machine's runnable threads right now (the caller included), from /proc/loadavg; -1 where unknown. In system.c. */
int pg_runnable_threads(void);

/* A spin-wait hint. */
static inline void pg_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Pins the calling thread to one CPU. Returns 0 or an errno value. */
static inline int pg_pin_current_thread(int cpu) {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
#else
    (void)cpu; return ENOSYS;
#endif
}

/* Names the calling thread (at most 15 characters are kept). */
static inline int pg_name_current_thread(const char *name) {
#if defined(__linux__)
    return pthread_setname_np(pthread_self(), name);
#else
    (void)name; return ENOSYS;
#endif
}

/* The CPU the calling thread runs on, or -1. */
static inline int pg_current_cpu(void) {
#if defined(__linux__)
    return sched_getcpu();
#else
    return -1;
#endif
}

/* Fills cpus (capacity entries) with the CPUs this process may run on; returns how many, or -1. */
static inline int pg_allowed_cpus(int *cpus, int capacity) {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
    int count = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && count < capacity; cpu++) {
        if (CPU_ISSET(cpu, &set)) cpus[count++] = cpu;
    }
    return count;
#else
    (void)cpus; (void)capacity; return -1;
#endif
}

/* The NUMA node of each page (status[i], or a negative errno) via move_pages(2) with no target nodes: a query.
 * Returns 0, or -1 with errno. */
static inline long pg_query_page_nodes(unsigned long count, void **pages, int *status) {
#if defined(__linux__) && defined(SYS_move_pages)
    return syscall(SYS_move_pages, 0, count, pages, NULL, status, 0);
#else
    (void)count; (void)pages; (void)status; errno = ENOSYS; return -1;
#endif
}

/* Cleanup registry: paths of temporary files and directory trees that must not outlive an interrupted process.
 * pg_cleanup_register copies path and returns a slot (-1 when full, out of memory, or once the process is being
 * torn down by a signal: then create nothing); register a path before creating it. pg_cleanup_unregister(slot)
 * forgets it (once the path is renamed into place or removed). After pg_cleanup_install_signal_handlers, SIGINT,
 * SIGTERM, SIGHUP, SIGQUIT and the crash signals (SIGSEGV, SIGBUS, SIGILL, SIGABRT, SIGFPE, SIGTRAP) remove every
 * registered file and every registered directory with its contents, then the signal goes to the action it had
 * before (by default, the process dies of it). Signals ignored at start stay ignored. Thread-safe; the handler is
 * async-signal-safe. pg_cleanup_block_signals_in_this_thread keeps the four interrupting signals away from a helper
 * thread, so that they are handled by a thread that creates the files (the main one). */
int pg_cleanup_register(const char *path, int is_directory);
void pg_cleanup_unregister(int slot);
int pg_cleanup_install_signal_handlers(void);
void pg_cleanup_block_signals_in_this_thread(void);

#endif

/*
 * alloc_check: phatgoose_runtime_apply allocates nothing once warm, through the C ABI as through Swift. Counts the
 * process's malloc/calloc/realloc calls (this program defines them, forwarding to glibc) around 1000 applies of one
 * layer, with and without routing outputs. Run by CI; glibc only.
 *
 *   alloc_check LIBRARY        (a library of the `tiny` shape)
 */
#include <phatgoose.h>

#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *pointer, size_t size);

static atomic_long allocations;
static atomic_int counting;

void *malloc(size_t size) {
    if (atomic_load(&counting)) atomic_fetch_add(&allocations, 1);
    return __libc_malloc(size);
}

void *calloc(size_t count, size_t size) {
    if (atomic_load(&counting)) atomic_fetch_add(&allocations, 1);
    return __libc_calloc(count, size);
}

void *realloc(void *pointer, size_t size) {
    if (atomic_load(&counting)) atomic_fetch_add(&allocations, 1);
    return __libc_realloc(pointer, size);
}

enum { TOKENS = 64, WIDTH = 32, SLOTS = 2, ROUNDS = 1000 };
static float x[TOKENS * WIDTH], out[TOKENS * WIDTH], weights[TOKENS * SLOTS];
static int32_t experts[TOKENS * SLOTS];

static long count_applies(phatgoose_runtime *runtime, phatgoose_layer *layer, int routing) {
    long before = atomic_load(&allocations);
    int i;
    atomic_store(&counting, 1);
    for (i = 0; i < ROUNDS; i++) {
        if (phatgoose_runtime_apply(runtime, layer, x, TOKENS, TOKENS * WIDTH, out, TOKENS * WIDTH, routing ? experts : NULL,
                                    routing ? weights : NULL, routing ? TOKENS * SLOTS : 0) != PHATGOOSE_STATUS_OK) {
            atomic_store(&counting, 0);
            fprintf(stderr, "alloc_check: apply: %s\n", phatgoose_last_error_message());
            return -1;
        }
    }
    atomic_store(&counting, 0);
    return atomic_load(&allocations) - before;
}

int main(int argc, char **argv) {
    phatgoose_runtime_options options;
    phatgoose_runtime *runtime = NULL;
    phatgoose_layer *layer = NULL, *probe = NULL;
    long with_routing, without_routing, probe_count;
    int i;

    if (argc != 2) {
        fprintf(stderr, "usage: alloc_check LIBRARY\n");
        return 2;
    }
    for (i = 0; i < TOKENS * WIDTH; i++) x[i] = (float)(i % 13) / 6.0f - 1.0f;
    phatgoose_runtime_options_init(&options, sizeof options);
    options.workers = 1;
    if (phatgoose_runtime_open(argv[1], &options, &runtime) != PHATGOOSE_STATUS_OK ||
        phatgoose_layer_create(runtime, "encoder.block.0.layer.0.SelfAttention.q", &layer) != PHATGOOSE_STATUS_OK) {
        fprintf(stderr, "alloc_check: %s\n", phatgoose_last_error_message());
        return 1;
    }
    /* Warm up: the runtime sizes its scratch on the first calls of a size. */
    if (count_applies(runtime, layer, 1) < 0 || count_applies(runtime, layer, 0) < 0) return 1;
    with_routing = count_applies(runtime, layer, 1);
    without_routing = count_applies(runtime, layer, 0);
    /* The counter counts: making a layer allocates. */
    atomic_store(&counting, 1);
    phatgoose_layer_create(runtime, "encoder.block.0.layer.0.SelfAttention.k", &probe);
    atomic_store(&counting, 0);
    probe_count = atomic_load(&allocations);
    phatgoose_runtime_destroy(runtime);
    printf("alloc_check: %d applies: %ld allocations with routing, %ld without (a layer_create: %ld)\n", ROUNDS, with_routing,
           without_routing, probe_count);
    if (with_routing != 0 || without_routing != 0 || probe_count == 0) {
        fprintf(stderr, "alloc_check: expected no allocation in warm applies (and some in layer_create)\n");
        return 1;
    }
    return 0;
}

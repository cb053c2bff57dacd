/*
 * abi_test: a check of the C ABI from C (and, compiled as C++17, from C++), run by CI against the installed header
 * and library. It calls every function of phatgoose.h, so linking it proves libphatgoose exports them all, and it
 * checks that misuse gets a status code, not a crash.
 *
 *   abi_test LIBRARY EXPERT_DIRECTORY      (a library of the `tiny` shape, and one more expert of that shape)
 *
 * Written in the common subset of C99 and C++17. Prints one line per failed check; exits 1 if any failed.
 */
#include <phatgoose.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(condition)                                                                                      \
    do {                                                                                                      \
        if (!(condition)) {                                                                                   \
            fprintf(stderr, "abi_test:%d: failed: %s (last error: %s)\n", __LINE__, #condition,               \
                    phatgoose_last_error_message());                                                          \
            failures++;                                                                                       \
        }                                                                                                     \
    } while (0)

#define EXPECT(call, status) CHECK((call) == (status))
#define MESSAGE_HAS(text) CHECK(strstr(phatgoose_last_error_message(), (text)) != NULL)

/* An options struct as a caller built against a newer header would pass: fields this library does not know. */
typedef struct newer_options {
    phatgoose_runtime_options known;
    unsigned char unknown[16];
} newer_options;

/* Non-finite rows: tokens 1 (a NaN) and 2 (an infinity) of x [8, 32] are refused, the other tokens are applied as
 * usual. `slots` of the layer; `clean` is the result of the same call on the input without the bad values. */
static void check_non_finite_rows(phatgoose_runtime *runtime, const phatgoose_layer *layer, const float *x, size_t slots) {
    float bad[8 * 32], clean[8 * 32], out[8 * 32], weights[8 * 8];
    int32_t experts[8 * 8];
    size_t t, j, c, wrong_routing = 0, wrong_output = 0;
    memcpy(bad, x, sizeof bad);
    for (c = 0; c < 8 * 32; c++) clean[c] = out[c] = 7.0f;
    CHECK(slots <= 8);
    EXPECT(phatgoose_runtime_apply(runtime, layer, x, 8, 8 * 32, clean, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_OK);
    bad[1 * 32 + 5] = (float)NAN;
    bad[2 * 32 + 0] = (float)INFINITY;
    EXPECT(phatgoose_runtime_apply(runtime, layer, bad, 8, 8 * 32, out, 8 * 32, experts, weights, 8 * slots),
           PHATGOOSE_STATUS_NON_FINITE_INPUT);
    MESSAGE_HAS("NaN or infinite values in the row (or sequence) of 2 of 8 tokens, the first token 1");
    for (t = 0; t < 8; t++) {
        int refused = t == 1 || t == 2;
        for (j = 0; j < slots; j++) {
            float w = weights[t * slots + j];
            wrong_routing += refused ? !(experts[t * slots + j] == -1 && w != w) : !(experts[t * slots + j] >= 0 && w == w);
        }
        /* Nothing is added to a refused token's row; the others get exactly what they get without the bad rows. */
        for (c = 0; c < 32; c++) wrong_output += out[t * 32 + c] != (refused ? 7.0f : clean[t * 32 + c]);
    }
    CHECK(wrong_routing == 0);
    CHECK(wrong_output == 0);
}

static const char *const Q = "encoder.block.0.layer.0.SelfAttention.q";  /* in 32, out 32 */
static const char *const WO = "encoder.block.0.layer.1.DenseReluDense.wo"; /* in 64, out 32 */

/* A distributed runtime on a world of one rank (this process, MPI's singleton start): the bits of
 * phatgoose_runtime_apply, and misuse refused. `runtime` serves the same library at top-k 2. */
static void check_distributed(const char *path, phatgoose_runtime *runtime, const phatgoose_layer *layer, const float *x) {
    phatgoose_distributed *served = NULL;
    float local[8 * 32], remote[8 * 32], local_weights[8 * 2], remote_weights[8 * 2];
    int32_t local_experts[8 * 2], remote_experts[8 * 2];
    size_t ranks = 0, experts = 0, index = 99, in_width = 0, out_width = 0, slots = 0;
    uint64_t resident = 0;
    if (!phatgoose_mpi_available()) {
        EXPECT(phatgoose_distributed_open(path, 2, 0, 0, 30.0, &served), PHATGOOSE_STATUS_UNAVAILABLE);
        CHECK(served == NULL);
        return;
    }
    EXPECT(phatgoose_distributed_open("", 2, 0, 0, 30.0, &served), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_distributed_open(path, 2, 0, 0, 30.0, NULL), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    CHECK(served == NULL);
    EXPECT(phatgoose_distributed_rank_count((const phatgoose_distributed *)runtime, &ranks), PHATGOOSE_STATUS_INVALID_HANDLE);
    MESSAGE_HAS("expected a distributed runtime handle, found a runtime handle");
    EXPECT(phatgoose_distributed_open(path, 2, 0, 0, 30.0, &served), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_distributed_rank_count(served, &ranks), PHATGOOSE_STATUS_OK);
    CHECK(ranks == 1);
    EXPECT(phatgoose_distributed_rank_share(served, 0, &resident, &experts), PHATGOOSE_STATUS_OK);
    CHECK(experts >= 2 && resident > 0);
    EXPECT(phatgoose_distributed_rank_share(served, 1, &resident, &experts), PHATGOOSE_STATUS_NOT_FOUND);
    EXPECT(phatgoose_distributed_module(served, "no.such.module", &index, NULL, NULL, NULL), PHATGOOSE_STATUS_NOT_FOUND);
    EXPECT(phatgoose_distributed_module(served, Q, &index, &in_width, &out_width, &slots), PHATGOOSE_STATUS_OK);
    CHECK(index == 0 && in_width == 32 && out_width == 32 && slots == 2);
    EXPECT(phatgoose_runtime_shutdown((phatgoose_runtime *)served), PHATGOOSE_STATUS_INVALID_HANDLE);
    MESSAGE_HAS("found a distributed runtime handle");

    memset(local, 0, sizeof local);
    memset(remote, 0, sizeof remote);
    EXPECT(phatgoose_runtime_apply(runtime, layer, x, 8, 8 * 32, local, 8 * 32, local_experts, local_weights, 8 * 2), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_distributed_apply(served, index, x, 8, 8 * 32, remote, 8 * 32, remote_experts, remote_weights, 8 * 2),
           PHATGOOSE_STATUS_OK);
    CHECK(memcmp(local, remote, sizeof local) == 0);
    CHECK(memcmp(local_experts, remote_experts, sizeof local_experts) == 0);
    CHECK(memcmp(local_weights, remote_weights, sizeof local_weights) == 0);
    memcpy(local, remote, sizeof local);
    EXPECT(phatgoose_distributed_apply(served, 36, x, 8, 8 * 32, remote, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_NOT_FOUND);
    EXPECT(phatgoose_distributed_apply(served, index, x, 8, 8 * 31, remote, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_SHAPE);
    MESSAGE_HAS("input_count: expected 256");
    EXPECT(phatgoose_distributed_apply(served, index, x, 8, 8 * 32, remote, 8 * 32, remote_experts, remote_weights, 15),
           PHATGOOSE_STATUS_SHAPE);
    EXPECT(phatgoose_distributed_apply(served, index, x, 8, 8 * 32, remote, 8 * 32, remote_experts, NULL, 16),
           PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_distributed_apply(served, index, NULL, 8, 8 * 32, remote, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    CHECK(memcmp(local, remote, sizeof local) == 0); /* failures write nothing */
    EXPECT(phatgoose_distributed_apply(served, index, NULL, 0, 0, NULL, 0, NULL, NULL, 0), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_distributed_destroy(served), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_distributed_rank_count(served, &ranks), PHATGOOSE_STATUS_INVALID_HANDLE);
    EXPECT(phatgoose_distributed_destroy(served), PHATGOOSE_STATUS_INVALID_HANDLE);
    EXPECT(phatgoose_distributed_destroy(NULL), PHATGOOSE_STATUS_OK);
}

int main(int argc, char **argv) {
    phatgoose_library *library = NULL, *served = NULL;
    phatgoose_runtime *runtime = NULL, *other = NULL;
    phatgoose_layer *q = NULL, *wo = NULL, *foreign = NULL;
    phatgoose_runtime_options options;
    phatgoose_layer_output entries[2];
    float x[8 * 64], out[8 * 32], out2[8 * 32], weights[8 * 2], wide_weights[8 * 16];
    int32_t experts[8 * 2], wide_experts[8 * 16], index = -1;
    newer_options newer;
    phatgoose_runtime *uniform = NULL;
    phatgoose_layer *uniform_q = NULL;
    size_t uniform_slots = 0, j;
    uint64_t calls = 0, tokens = 0, rejected = 0, per_expert[16];
    size_t count = 0, length = 0, in_width = 0, out_width = 0, slots = 0, i;
    char name[64], expected[160];

    if (argc != 3) {
        fprintf(stderr, "usage: abi_test LIBRARY EXPERT_DIRECTORY\n");
        return 2;
    }
    for (i = 0; i < 8 * 64; i++) x[i] = (float)((int)(i * 37 % 101) - 50) / 25.0f;
    memset(out, 0, sizeof out);

    /* Versions and names. */
    CHECK(phatgoose_abi_version() == PHATGOOSE_ABI_VERSION);
    CHECK(strcmp(phatgoose_version(), "0.1.0") == 0 || strlen(phatgoose_version()) >= 5);
    CHECK(strcmp(phatgoose_status_name(PHATGOOSE_STATUS_SHAPE), "shape") == 0);
    CHECK(strcmp(phatgoose_status_name(PHATGOOSE_STATUS_NON_FINITE_INPUT), "non-finite-input") == 0);
    CHECK(strcmp(phatgoose_status_name(PHATGOOSE_STATUS_UNAVAILABLE), "unavailable") == 0);
    CHECK(strcmp(phatgoose_status_name(PHATGOOSE_STATUS_TIMEOUT), "timeout") == 0);
    CHECK(strcmp(phatgoose_status_name((phatgoose_status)15), "unknown") == 0);

    /* Libraries. */
    EXPECT(phatgoose_library_open("/nonexistent", &library), PHATGOOSE_STATUS_IO);
    CHECK(strstr(phatgoose_last_error_message(), "/nonexistent") != NULL);
    CHECK(library == NULL);
    EXPECT(phatgoose_library_open(NULL, &library), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_library_open("", &library), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    MESSAGE_HAS("path: expected the path of a library (a directory or a packed file), found an empty string");
    EXPECT(phatgoose_runtime_open("", NULL, &runtime), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    MESSAGE_HAS("found an empty string");
    CHECK(library == NULL && runtime == NULL);
    EXPECT(phatgoose_library_open(argv[1], NULL), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_library_open(argv[1], &library), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_library_expert_count(library, &count), PHATGOOSE_STATUS_OK);
    CHECK(count >= 2 && count <= 15);
    EXPECT(phatgoose_library_module_count(library, &count), PHATGOOSE_STATUS_OK);
    CHECK(count == 36);
    EXPECT(phatgoose_library_module_name(library, 0, name, sizeof name, &length), PHATGOOSE_STATUS_OK);
    CHECK(strcmp(name, Q) == 0 && length == strlen(Q));
    EXPECT(phatgoose_library_module_name(library, 0, name, 4, &length), PHATGOOSE_STATUS_BUFFER_TOO_SMALL);
    EXPECT(phatgoose_library_expert_name(library, 0, name, sizeof name, NULL), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_library_expert_name(library, 1000, name, sizeof name, NULL), PHATGOOSE_STATUS_NOT_FOUND);
    EXPECT(phatgoose_library_module_widths(library, 6, &in_width, &out_width), PHATGOOSE_STATUS_OK);
    CHECK(in_width == 64 && out_width == 32);
    EXPECT(phatgoose_library_expert_count(NULL, &count), PHATGOOSE_STATUS_INVALID_HANDLE);

    /* Runtimes and options. */
    EXPECT(phatgoose_runtime_options_init(&options, sizeof options), PHATGOOSE_STATUS_OK);
    CHECK(options.struct_size == sizeof options && options.workers == PHATGOOSE_WORKERS_DEFAULT);
    /* A newer caller's larger struct: the known fields get their defaults, the bytes beyond them zeros. */
    memset(&newer, 0xAB, sizeof newer);
    EXPECT(phatgoose_runtime_options_init(&newer.known, sizeof newer), PHATGOOSE_STATUS_OK);
    CHECK(newer.known.struct_size == sizeof newer && newer.known.max_queued_calls == 64 && newer.known.reserved == 0);
    for (i = 0; i < sizeof newer.unknown; i++) CHECK(newer.unknown[i] == 0);
    EXPECT(phatgoose_runtime_options_init(&newer.known, 8), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_runtime_options_init(&newer.known, 5000), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    CHECK(newer.known.struct_size == sizeof newer); /* failures write nothing */
    options.top_k = PHATGOOSE_MAX_TOP_K + 1;
    EXPECT(phatgoose_runtime_create(library, &options, &runtime), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    CHECK(runtime == NULL);
    options.top_k = 2;
    options.workers = 1;
    EXPECT(phatgoose_runtime_create(library, &options, &runtime), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_runtime_open(argv[1], NULL, &other), PHATGOOSE_STATUS_OK);
    /* Zero bytes beyond the known fields are accepted (a newer caller that left its new fields alone), others not. */
    newer.known.workers = 1;
    newer.unknown[3] = 1;
    EXPECT(phatgoose_runtime_create(library, &newer.known, &uniform), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    snprintf(expected, sizeof expected, "expected zero bytes beyond the %zu this library knows", sizeof(phatgoose_runtime_options));
    MESSAGE_HAS(expected);
    snprintf(expected, sizeof expected, "found byte %zu = 0x1", sizeof(phatgoose_runtime_options) + 3);
    MESSAGE_HAS(expected);
    /* A caller of ABI 1 (56 bytes, up to memory_cap_bytes) is served with the later fields at their defaults. */
    memset(&newer, 0xAB, sizeof newer);
    EXPECT(phatgoose_runtime_options_init(&newer.known, 56), PHATGOOSE_STATUS_OK);
    CHECK(newer.known.struct_size == 56 && newer.known.spin_microseconds == (int32_t)0xABABABAB);
    EXPECT(phatgoose_runtime_create(library, &newer.known, &uniform), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_runtime_destroy(uniform), PHATGOOSE_STATUS_OK);
    uniform = NULL;
    memset(&newer, 0, sizeof newer);
    EXPECT(phatgoose_runtime_options_init(&newer.known, sizeof newer), PHATGOOSE_STATUS_OK);
    CHECK(newer.known.spin_microseconds == PHATGOOSE_SPIN_DEFAULT && newer.known.parallel_min_tokens == 1);
    newer.known.workers = 1;
    newer.known.spin_microseconds = -5;
    EXPECT(phatgoose_runtime_create(library, &newer.known, &uniform), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    MESSAGE_HAS("options spin_microseconds");
    newer.known.spin_microseconds = PHATGOOSE_SPIN_NONE;
    newer.known.parallel_min_tokens = 64;
    CHECK(uniform == NULL);
    newer.unknown[3] = 0;
    newer.known.struct_size = 5000;
    EXPECT(phatgoose_runtime_create(library, &newer.known, &uniform), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    newer.known.struct_size = sizeof newer;
    newer.known.router = PHATGOOSE_ROUTER_UNIFORM;
    EXPECT(phatgoose_runtime_create(library, &newer.known, &uniform), PHATGOOSE_STATUS_OK);
    /* A live handle of another kind is named as such; bits that are no live handle (garbage, even with another
     * kind's low bits; a destroyed handle) are no handle at all. */
    EXPECT(phatgoose_runtime_shutdown((phatgoose_runtime *)library), PHATGOOSE_STATUS_INVALID_HANDLE);
    MESSAGE_HAS("runtime: expected a runtime handle, found a library handle");
    EXPECT(phatgoose_runtime_shutdown((phatgoose_runtime *)(uintptr_t)0xDEADBEE1u), PHATGOOSE_STATUS_INVALID_HANDLE);
    MESSAGE_HAS("runtime: expected a live runtime handle, found no handle (0xdeadbee1");
    EXPECT(phatgoose_library_expert_count((phatgoose_library *)(uintptr_t)0x7F0012345678ull, &count), PHATGOOSE_STATUS_INVALID_HANDLE);
    MESSAGE_HAS("found no handle");
    EXPECT(phatgoose_library_destroy(library), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_library_destroy(library), PHATGOOSE_STATUS_INVALID_HANDLE); /* destroyed handle used again */
    MESSAGE_HAS("library: expected a live library handle, found no handle");
    EXPECT(phatgoose_runtime_create(library, NULL, &runtime), PHATGOOSE_STATUS_INVALID_HANDLE);
    EXPECT(phatgoose_runtime_shutdown((phatgoose_runtime *)library), PHATGOOSE_STATUS_INVALID_HANDLE);
    CHECK(strstr(phatgoose_last_error_message(), "found no handle") != NULL &&
          strstr(phatgoose_last_error_message(), "library handle") == NULL);

    /* Layers. */
    EXPECT(phatgoose_layer_create(runtime, "no.such.module", &q), PHATGOOSE_STATUS_NOT_FOUND);
    EXPECT(phatgoose_layer_create(runtime, Q, &q), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_layer_create(runtime, WO, &wo), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_layer_create(other, Q, &foreign), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_layer_shape(q, &in_width, &out_width, &slots), PHATGOOSE_STATUS_OK);
    CHECK(in_width == 32 && out_width == 32 && slots == 2);
    EXPECT(phatgoose_layer_shape((const phatgoose_layer *)runtime, NULL, NULL, NULL), PHATGOOSE_STATUS_INVALID_HANDLE);

    /* Applying, and its misuse. */
    EXPECT(phatgoose_runtime_apply(runtime, q, x, 8, 8 * 32, out, 8 * 32, experts, weights, 8 * 2), PHATGOOSE_STATUS_OK);
    CHECK(experts[0] >= 0 && weights[0] > 0.0f);
    memcpy(out2, out, sizeof out);
    EXPECT(phatgoose_runtime_apply(NULL, q, x, 8, 8 * 32, out, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_INVALID_HANDLE);
    EXPECT(phatgoose_runtime_apply(runtime, NULL, x, 8, 8 * 32, out, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_INVALID_HANDLE);
    EXPECT(phatgoose_runtime_apply(runtime, foreign, x, 8, 8 * 32, out, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_INVALID_HANDLE);
    EXPECT(phatgoose_runtime_apply(runtime, q, x, 8, 8 * 31, out, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_SHAPE);
    EXPECT(phatgoose_runtime_apply(runtime, q, x, 8, 8 * 32, out, 8 * 64, NULL, NULL, 0), PHATGOOSE_STATUS_SHAPE);
    EXPECT(phatgoose_runtime_apply(runtime, q, x, SIZE_MAX, 8 * 32, out, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_SHAPE);
    EXPECT(phatgoose_runtime_apply(runtime, q, NULL, 8, 8 * 32, out, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_runtime_apply(runtime, q, x, 8, 8 * 32, x, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_runtime_apply(runtime, q, x, 8, 8 * 32, out, 8 * 32, experts, NULL, 16), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_runtime_apply(runtime, q, x, 8, 8 * 32, out, 8 * 32, experts, weights, 15), PHATGOOSE_STATUS_SHAPE);
    CHECK(memcmp(out, out2, sizeof out) == 0); /* failures write nothing */
    EXPECT(phatgoose_runtime_apply(runtime, q, NULL, 0, 0, NULL, 0, NULL, NULL, 0), PHATGOOSE_STATUS_OK);

    entries[0].layer = q;
    entries[0].output = out;
    entries[0].output_count = 8 * 32;
    entries[0].experts = NULL;
    entries[0].weights = NULL;
    entries[0].routing_count = 0;
    entries[1] = entries[0];
    entries[1].layer = wo;
    entries[1].output = out2;
    EXPECT(phatgoose_runtime_apply_layers(runtime, x, 8, 8 * 32, entries, 2), PHATGOOSE_STATUS_SHAPE); /* widths differ */
    EXPECT(phatgoose_runtime_apply_layers(runtime, x, 8, 8 * 32, entries, 0), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_runtime_apply_layers(runtime, x, 8, 8 * 32, NULL, 1), PHATGOOSE_STATUS_INVALID_ARGUMENT);
    EXPECT(phatgoose_runtime_apply_layers(runtime, x, 8, 8 * 32, entries, 1), PHATGOOSE_STATUS_OK);

    /* Experts and statistics. */
    EXPECT(phatgoose_runtime_add_expert(runtime, argv[2], "added", &index), PHATGOOSE_STATUS_OK);
    CHECK(index >= 2);
    EXPECT(phatgoose_runtime_add_expert(runtime, argv[2], "added", &index), PHATGOOSE_STATUS_LIBRARY);
    EXPECT(phatgoose_runtime_remove_expert(runtime, "added"), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_runtime_remove_expert(runtime, "added"), PHATGOOSE_STATUS_NOT_FOUND);
    EXPECT(phatgoose_runtime_library(runtime, &served), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_library_expert_count(served, &count), PHATGOOSE_STATUS_OK);
    CHECK(count == (size_t)index + 1);
    EXPECT(phatgoose_library_destroy(served), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_runtime_statistics(runtime, &calls, &tokens, &rejected, per_expert, 1, &count), PHATGOOSE_STATUS_BUFFER_TOO_SMALL);
    EXPECT(phatgoose_runtime_statistics(runtime, &calls, &tokens, &rejected, per_expert, 16, &count), PHATGOOSE_STATUS_OK);
    CHECK(calls == 2 && tokens == 16 && rejected == 0 && count == (size_t)index + 1);

    /* Non-finite input rows, with a scoring router and with the uniform router (which scores nothing). */
    check_non_finite_rows(runtime, q, x, 2);
    EXPECT(phatgoose_layer_create(uniform, Q, &uniform_q), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_layer_shape(uniform_q, NULL, NULL, &uniform_slots), PHATGOOSE_STATUS_OK);
    CHECK(uniform_slots >= 2 && uniform_slots <= 7);
    check_non_finite_rows(uniform, uniform_q, x, uniform_slots);

    /* The uniform router's slots follow the experts: routing buffers with rows wider than the slots stay valid
     * (their extra slots get expert -1, weight 0), so a caller racing expert changes can size them with headroom. */
    EXPECT(phatgoose_runtime_add_expert(uniform, argv[2], "added", NULL), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_layer_shape(uniform_q, NULL, NULL, &slots), PHATGOOSE_STATUS_OK);
    CHECK(slots == uniform_slots + 1);
    EXPECT(phatgoose_runtime_apply(uniform, uniform_q, x, 8, 8 * 32, out, 8 * 32, wide_experts, wide_weights, 8 * uniform_slots),
           PHATGOOSE_STATUS_SHAPE); /* too few slots per row: nothing written */
    EXPECT(phatgoose_runtime_remove_expert(uniform, "added"), PHATGOOSE_STATUS_OK);
    for (i = 0; i < 8 * 16; i++) wide_experts[i] = 99;
    EXPECT(phatgoose_runtime_apply(uniform, uniform_q, x, 8, 8 * 32, out, 8 * 32, wide_experts, wide_weights, 8 * (uniform_slots + 1)),
           PHATGOOSE_STATUS_OK); /* sized for the slots before the removal */
    for (i = 0; i < 8; i++) {
        for (j = 0; j < uniform_slots; j++) CHECK(wide_experts[i * (uniform_slots + 1) + j] >= 0);
        CHECK(wide_experts[i * (uniform_slots + 1) + uniform_slots] == -1 && wide_weights[i * (uniform_slots + 1) + uniform_slots] == 0.0f);
    }
    EXPECT(phatgoose_runtime_apply(uniform, uniform_q, x, 8, 8 * 32, out, 8 * 32, wide_experts, wide_weights, 8 * uniform_slots + 1),
           PHATGOOSE_STATUS_SHAPE); /* not a whole number of rows */
    EXPECT(phatgoose_runtime_destroy(uniform), PHATGOOSE_STATUS_OK);

    /* A distributed runtime of one rank. */
    check_distributed(argv[1], runtime, q, x);

    /* Shutdown, then destruction. */
    EXPECT(phatgoose_runtime_shutdown(runtime), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_runtime_shutdown(runtime), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_runtime_apply(runtime, q, x, 8, 8 * 32, out, 8 * 32, NULL, NULL, 0), PHATGOOSE_STATUS_SHUT_DOWN);
    EXPECT(phatgoose_layer_create(runtime, Q, &foreign), PHATGOOSE_STATUS_SHUT_DOWN);
    EXPECT(phatgoose_runtime_statistics(runtime, &calls, NULL, NULL, NULL, 0, NULL), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_layer_destroy(wo), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_layer_destroy(wo), PHATGOOSE_STATUS_INVALID_HANDLE);
    EXPECT(phatgoose_runtime_destroy(runtime), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_layer_shape(q, NULL, NULL, NULL), PHATGOOSE_STATUS_INVALID_HANDLE); /* went with its runtime */
    EXPECT(phatgoose_runtime_destroy(runtime), PHATGOOSE_STATUS_INVALID_HANDLE);
    EXPECT(phatgoose_runtime_destroy(other), PHATGOOSE_STATUS_OK);
    EXPECT(phatgoose_runtime_destroy(NULL), PHATGOOSE_STATUS_OK);

    if (failures > 0) {
        fprintf(stderr, "abi_test: %d checks failed\n", failures);
        return 1;
    }
    printf("abi_test: all checks passed\n");
    return 0;
}

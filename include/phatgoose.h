/*
 * phatgoose.h: the C ABI of Phatgoose, PHATGOOSE mixture-of-LoRA-experts routing on CPUs.
 *
 * This header is the contract. It compiles as C99 and C++17 (-Wall -Wextra -pedantic). Link with -lphatgoose
 * (see docs/embedding.md for the install step and a worked example).
 *
 * Objects. Four kinds of opaque handle, each made by a _create/_open function and released by its _destroy:
 *   phatgoose_library   an expert library as loaded from disk (a directory or a packed file); read-only.
 *   phatgoose_runtime   serves a library: owns worker threads and node-bound copies of the expert weights.
 *   phatgoose_layer     one routed layer (module) of a runtime, resolved once from its name.
 *   phatgoose_distributed  a library's experts sharded over the ranks of an MPI world, on rank 0 (docs/scale-out.md).
 * A handle is a checked token, not a pointer to memory: every function validates the handles it is given on entry,
 * so NULL, a handle already destroyed, a handle of the wrong kind or a layer of another runtime gets
 * PHATGOOSE_STATUS_INVALID_HANDLE, never a crash. The message tells a live handle of another kind ("found a library
 * handle") from bits that are no live handle at all (garbage, destroyed: "found no handle"). Destroying a runtime
 * also destroys its layers.
 *
 * Errors. Every function that can fail returns a phatgoose_status. On failure the function changes none of its
 * outputs (except where stated) and phatgoose_last_error_message() returns one line naming what was expected and
 * what was found. Misuse (NULL pointers, wrong sizes, unknown names, calls after shutdown) is reported this way.
 *
 * Threads. Each function states its thread safety. In short: everything may be called from any thread; calls on one
 * runtime may run concurrently (they share its executor one at a time, bounded by max_queued_calls); a handle must
 * not be destroyed while the caller still intends to use it, but a concurrent destroy is detected safely (calls
 * that already started finish, later ones get PHATGOOSE_STATUS_INVALID_HANDLE).
 *
 * Buffers are row-major float32 / int32 in native byte order, 4-byte aligned, and must not overlap each other.
 * Sizes are element counts (not bytes) and must equal what the call needs exactly; only routing buffers may have
 * rows wider than needed (see phatgoose_runtime_apply).
 *
 * Only 64-bit platforms are supported.
 */
#ifndef PHATGOOSE_H
#define PHATGOOSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------------------------
 * Versions
 * ------------------------------------------------------------------------------------------------------------ */

#define PHATGOOSE_VERSION_MAJOR 0
#define PHATGOOSE_VERSION_MINOR 1
#define PHATGOOSE_VERSION_PATCH 0
/* Bumped on any incompatible change to this header's types or functions. */
#define PHATGOOSE_ABI_VERSION 1

/* The library's version, "MAJOR.MINOR.PATCH". Static storage. Thread safety: any thread, any time. */
const char *phatgoose_version(void);

/* The library's PHATGOOSE_ABI_VERSION; compare it with the header's to detect a mismatched libphatgoose.so.
 * Thread safety: any thread, any time. */
uint32_t phatgoose_abi_version(void);

/* ---------------------------------------------------------------------------------------------------------------
 * Status codes and messages
 * ------------------------------------------------------------------------------------------------------------ */

typedef enum phatgoose_status {
    PHATGOOSE_STATUS_OK = 0,
    /* A NULL pointer where one is required, an option out of range, a string that is not UTF-8, buffers that
     * overlap or are misaligned. */
    PHATGOOSE_STATUS_INVALID_ARGUMENT = 1,
    /* NULL, destroyed, unknown or wrong-kind handle; a layer of another runtime. */
    PHATGOOSE_STATUS_INVALID_HANDLE = 2,
    /* A buffer's element count does not match the call (tokens x width). */
    PHATGOOSE_STATUS_SHAPE = 3,
    /* No layer or expert of that name (any more), or an index out of range. */
    PHATGOOSE_STATUS_NOT_FOUND = 4,
    /* A file could not be opened, mapped or read. */
    PHATGOOSE_STATUS_IO = 5,
    /* The library or an expert's files are invalid, or an expert cannot be added as asked (name in use, widths
     * that disagree). */
    PHATGOOSE_STATUS_LIBRARY = 6,
    /* Admission control refused the call (more than max_queued_calls at once); retry later. */
    PHATGOOSE_STATUS_OVERLOADED = 7,
    /* Loading would exceed memory_cap_bytes. */
    PHATGOOSE_STATUS_MEMORY_CAP = 8,
    /* The runtime was shut down. */
    PHATGOOSE_STATUS_SHUT_DOWN = 9,
    /* A caller's buffer is too small; the needed size was stored. */
    PHATGOOSE_STATUS_BUFFER_TOO_SMALL = 10,
    /* A failure the library did not expect; the message says what. */
    PHATGOOSE_STATUS_INTERNAL = 11,
    /* Some input rows held NaN or infinite values. Unlike every other failure, the call's outputs ARE written: the
     * other rows were applied as usual, and those rows were not routed (see phatgoose_runtime_apply). A caller
     * built against an older header, which lacks it, sees a failure it does not know. */
    PHATGOOSE_STATUS_NON_FINITE_INPUT = 12,
    /* This build lacks what the call needs (a distributed runtime in a build without MPI). */
    PHATGOOSE_STATUS_UNAVAILABLE = 13,
    /* A rank of a distributed runtime did not answer in time (it died or hangs); the runtime serves no more calls. */
    PHATGOOSE_STATUS_TIMEOUT = 14
} phatgoose_status;

/* A short stable name for a status ("ok", "invalid-argument", ..., "unknown"). Static storage.
 * Thread safety: any thread, any time. */
const char *phatgoose_status_name(phatgoose_status status);

/* The message of the last failing call on the calling thread ("" when none has failed). Successful calls leave it
 * unchanged, like errno. Valid until the next failing call on the same thread.
 * Thread safety: any thread; each thread has its own message. */
const char *phatgoose_last_error_message(void);

/* ---------------------------------------------------------------------------------------------------------------
 * Handles
 * ------------------------------------------------------------------------------------------------------------ */

typedef struct phatgoose_library phatgoose_library;
typedef struct phatgoose_runtime phatgoose_runtime;
typedef struct phatgoose_layer phatgoose_layer;
typedef struct phatgoose_distributed phatgoose_distributed;

/* ---------------------------------------------------------------------------------------------------------------
 * Libraries
 * ------------------------------------------------------------------------------------------------------------ */

/* Opens and validates the library at `path` (a directory in the PEFT layout or a packed file) into *library. An
 * empty path is PHATGOOSE_STATUS_INVALID_ARGUMENT. Thread safety: any thread. */
phatgoose_status phatgoose_library_open(const char *path, phatgoose_library **library);

/* Releases a library. Runtimes created from it are unaffected. NULL is a no-op; a handle destroyed already gets
 * PHATGOOSE_STATUS_INVALID_HANDLE. Thread safety: any thread; the handle is invalid afterwards for every thread. */
phatgoose_status phatgoose_library_destroy(phatgoose_library *library);

/* Number of experts (the expert index runs over 0 ..< count, including experts removed from a runtime, whose
 * indices stay reserved). Thread safety: any thread, concurrently with any other call. */
phatgoose_status phatgoose_library_expert_count(const phatgoose_library *library, size_t *count);

/* Number of routed modules (layers), in model order. Thread safety: as phatgoose_library_expert_count. */
phatgoose_status phatgoose_library_module_count(const phatgoose_library *library, size_t *count);

/* The name of expert `index` / module `index`, NUL-terminated, into buffer[0 ..< capacity]. *length (optional)
 * receives the name's length in bytes without the NUL. When capacity <= length the buffer is not written and
 * PHATGOOSE_STATUS_BUFFER_TOO_SMALL is returned with *length set (buffer may then be NULL with capacity 0).
 * Thread safety: as phatgoose_library_expert_count. */
phatgoose_status phatgoose_library_expert_name(const phatgoose_library *library, size_t index, char *buffer,
                                               size_t capacity, size_t *length);
phatgoose_status phatgoose_library_module_name(const phatgoose_library *library, size_t index, char *buffer,
                                               size_t capacity, size_t *length);

/* Input and output widths of module `index`. Either pointer may be NULL.
 * Thread safety: as phatgoose_library_expert_count. */
phatgoose_status phatgoose_library_module_widths(const phatgoose_library *library, size_t index, size_t *in_width,
                                                 size_t *out_width);

/* ---------------------------------------------------------------------------------------------------------------
 * Runtime options
 * ------------------------------------------------------------------------------------------------------------ */

typedef enum phatgoose_router {
    PHATGOOSE_ROUTER_DEFAULT = 0, /* the library's (library.json "routing"; PHATGOOSE without a manifest) */
    PHATGOOSE_ROUTER_PHATGOOSE = 1,
    PHATGOOSE_ROUTER_ARROW = 2,
    PHATGOOSE_ROUTER_UNIFORM = 3
} phatgoose_router;

typedef enum phatgoose_executor {
    PHATGOOSE_EXECUTOR_PINNED = 0,  /* named worker threads pinned to CPUs of their node (the default) */
    PHATGOOSE_EXECUTOR_DISPATCH = 1 /* the Dispatch global queue (not pinned) */
} phatgoose_executor;

typedef enum phatgoose_placement {
    PHATGOOSE_PLACEMENT_DISTRIBUTE = 0,    /* experts spread over NUMA nodes, balanced by bytes (the default) */
    PHATGOOSE_PLACEMENT_ISOLATE = 1,       /* every expert on node placement_argument */
    PHATGOOSE_PLACEMENT_REPLICATE_HOT = 2, /* distribute, plus the placement_argument largest experts on every node */
    PHATGOOSE_PLACEMENT_IN_PLACE = 3       /* no copies: weights stay in the library's file mapping */
} phatgoose_placement;

/* Worker threads besides the caller: one fewer than the CPUs this process may use. */
#define PHATGOOSE_WORKERS_DEFAULT (-1)
/* The largest top_k accepted. */
#define PHATGOOSE_MAX_TOP_K 4096
/* spin_microseconds: idle pinned workers spin the default 50 us before sleeping (0, as in an ABI 1 struct), or sleep
 * at once (PHATGOOSE_SPIN_NONE). */
#define PHATGOOSE_SPIN_DEFAULT 0
#define PHATGOOSE_SPIN_NONE (-1)
/* contended_min_tokens: never keep dispatches on the caller for contention. */
#define PHATGOOSE_CONTENDED_OFF (-1)

/* How a runtime serves. Always initialise with phatgoose_runtime_options_init(&options, sizeof options), then set
 * fields: struct_size tells the library which fields the caller knows, so the struct can grow compatibly.
 * struct_size must be from 56 (the struct of ABI 1, up to memory_cap_bytes) to 4096; the fields after
 * memory_cap_bytes came later (sizeof is 72 now), and a smaller struct_size leaves them at their defaults. A library given a larger struct (built
 * against a newer header) accepts it when every byte beyond the fields it knows is zero, which is what
 * phatgoose_runtime_options_init writes there and what every field added later means "as before"; a non-zero byte
 * there asks for something this library cannot do and is PHATGOOSE_STATUS_INVALID_ARGUMENT, naming its offset. */
typedef struct phatgoose_runtime_options {
    uint32_t struct_size;       /* sizeof(phatgoose_runtime_options) as the caller compiled it */
    int32_t router;             /* a phatgoose_router */
    int32_t top_k;              /* experts per token; 0: the library's; else 1 ... PHATGOOSE_MAX_TOP_K */
    int32_t sequence_length;    /* 0: route each token; n > 0: the mean of each n consecutive tokens routes them */
    float arrow_temperature;    /* Arrow: scores are |x . prototype| / temperature (> 0; default 10) */
    int32_t arrow_scaled;       /* Arrow: nonzero also scales scores by 1/sqrt(in) */
    int32_t workers;            /* 0 ... 1024, or PHATGOOSE_WORKERS_DEFAULT */
    int32_t executor;           /* a phatgoose_executor */
    int32_t placement;          /* a phatgoose_placement */
    int32_t placement_argument; /* the node for ISOLATE, the count for REPLICATE_HOT; else ignored */
    int32_t max_queued_calls;   /* calls admitted at once (running plus waiting), >= 1; default 64 */
    int32_t reserved;           /* must be 0 */
    uint64_t memory_cap_bytes;  /* most bytes of expert weights held (copies included); 0: no cap */
    int32_t spin_microseconds;  /* idle pinned workers spin this long, then sleep: 1 ... 1000000, PHATGOOSE_SPIN_DEFAULT
                                   (0: 50) or PHATGOOSE_SPIN_NONE (-1: sleep at once) */
    int32_t parallel_min_tokens; /* calls of fewer tokens run on the caller alone, waking no worker (a model's decode
                                    steps beside its own threads); 0 or 1: any call may use the workers */
    int32_t lanes;              /* dispatch lanes, how many dispatches may run at once: 0 for one per participant
                                   (workers + 1), else 1 ... workers + 1 (1: one dispatch at a time) */
    int32_t contended_min_tokens; /* while a pinned worker was seen preempted, dispatches of fewer tokens run on the
                                     caller alone: 0 for the default 64, PHATGOOSE_CONTENDED_OFF (-1) for never, else
                                     a token count */
} phatgoose_runtime_options;

/* Fills the first struct_size bytes of *options: the fields this library knows with their defaults (struct_size set
 * to the struct_size given), any bytes beyond them with zeros. Pass sizeof(phatgoose_runtime_options); a size
 * outside 56 ... 4096 is PHATGOOSE_STATUS_INVALID_ARGUMENT, writing nothing. A field that does not fit whole in
 * struct_size counts as unknown: its bytes are zeroed. Thread safety: any thread. */
phatgoose_status phatgoose_runtime_options_init(phatgoose_runtime_options *options, size_t struct_size);

/* ---------------------------------------------------------------------------------------------------------------
 * Runtimes
 * ------------------------------------------------------------------------------------------------------------ */

/* Serves `library` (which may be destroyed afterwards) with `options` (NULL: defaults), into *runtime.
 * Thread safety: any thread; `library` may be used concurrently by others. */
phatgoose_status phatgoose_runtime_create(const phatgoose_library *library, const phatgoose_runtime_options *options,
                                          phatgoose_runtime **runtime);

/* Opens the library at `path` and serves it: phatgoose_library_open plus phatgoose_runtime_create.
 * Thread safety: any thread. */
phatgoose_status phatgoose_runtime_open(const char *path, const phatgoose_runtime_options *options,
                                        phatgoose_runtime **runtime);

/* Stops the worker threads. Calls in progress finish; later calls on the runtime and its layers get
 * PHATGOOSE_STATUS_SHUT_DOWN, except phatgoose_runtime_statistics, phatgoose_runtime_library and the _destroy
 * functions. Idempotent. Thread safety: any thread, concurrently with calls (it waits for the running one). */
phatgoose_status phatgoose_runtime_shutdown(phatgoose_runtime *runtime);

/* Shuts the runtime down (if not yet) and releases it and every layer made from it. NULL is a no-op.
 * Thread safety: any thread; calls already inside the runtime finish first (their memory stays valid), calls
 * that start afterwards get PHATGOOSE_STATUS_INVALID_HANDLE. */
phatgoose_status phatgoose_runtime_destroy(phatgoose_runtime *runtime);

/* A library handle describing what the runtime serves now (after any experts added or removed). Destroy it with
 * phatgoose_library_destroy. Thread safety: any thread, concurrently with any call. */
phatgoose_status phatgoose_runtime_library(const phatgoose_runtime *runtime, phatgoose_library **library);

/* Adds the expert in `directory` (PEFT layout: adapter_config.json, adapter_model.safetensors, gates.safetensors)
 * under `name`, with the next expert index (stored in *index, optional). Calls in flight are unaffected; later
 * calls route to it. Fails, changing nothing, when the files are invalid, the name is in use, a module's widths
 * disagree or the memory cap would be exceeded. With the uniform router, layers gaining a candidate gain a slot
 * (and phatgoose_runtime_remove_expert takes one away): see phatgoose_runtime_apply for sizing routing buffers.
 * Thread safety: any thread, concurrently with calls; changes to one runtime are serialised. */
phatgoose_status phatgoose_runtime_add_expert(phatgoose_runtime *runtime, const char *directory, const char *name,
                                              int32_t *index);

/* Stops routing to the expert `name` (its index stays reserved). A module left without candidates disappears;
 * its layers then get PHATGOOSE_STATUS_NOT_FOUND. Thread safety: as phatgoose_runtime_add_expert. */
phatgoose_status phatgoose_runtime_remove_expert(phatgoose_runtime *runtime, const char *name);

/* Counters since the runtime started: calls (one per layer applied), tokens (summed over layers), calls rejected
 * by admission control (each optional), and token assignments per expert index (a token choosing two experts
 * counts once for each). *expert_count (optional) receives the number of experts; tokens_per_expert may be NULL
 * (then capacity is ignored), else capacity must be at least that number or PHATGOOSE_STATUS_BUFFER_TOO_SMALL is
 * returned with nothing but *expert_count written. Thread safety: any thread, concurrently with calls; the
 * counters are read together, as one snapshot. */
phatgoose_status phatgoose_runtime_statistics(const phatgoose_runtime *runtime, uint64_t *calls, uint64_t *tokens,
                                              uint64_t *rejected, uint64_t *tokens_per_expert, size_t capacity,
                                              size_t *expert_count);

/* ---------------------------------------------------------------------------------------------------------------
 * Layers
 * ------------------------------------------------------------------------------------------------------------ */

/* The layer of `runtime` named `name` (a module name such as "encoder.block.0.layer.0.SelfAttention.q"), into
 * *layer; PHATGOOSE_STATUS_NOT_FOUND when the library has no such module. Thread safety: any thread. */
phatgoose_status phatgoose_layer_create(phatgoose_runtime *runtime, const char *name, phatgoose_layer **layer);

/* Releases a layer. NULL is a no-op. Thread safety: any thread. */
phatgoose_status phatgoose_layer_destroy(phatgoose_layer *layer);

/* The layer's input width, output width and routing slots per token (top-k; every candidate with the uniform
 * router, so then it changes when experts are added or removed). Each pointer is optional.
 * Thread safety: any thread, concurrently with calls. */
phatgoose_status phatgoose_layer_shape(const phatgoose_layer *layer, size_t *in_width, size_t *out_width,
                                       size_t *slots);

/* ---------------------------------------------------------------------------------------------------------------
 * Applying layers
 * ------------------------------------------------------------------------------------------------------------ */

/* Routes `tokens` rows of `input` ([tokens, in], input_count == tokens * in) at `layer` and ADDS the mixture delta
 * (sum over each token's chosen experts of weight * scale * B (A x); without W x) into `output` ([tokens, out],
 * output_count == tokens * out). When `experts` and `weights` are given (both or neither), they receive each
 * token's choices, [tokens, stride] with routing_count == tokens * stride and stride = routing_count / tokens at
 * least the layer's slots: expert indices best first (-1 for a padded slot, when a module has fewer candidates than
 * k) and mixture weights; slots of a row beyond the layer's slots get expert -1 and weight 0. Sizing the rows with
 * phatgoose_layer_shape's slots is exact; with the uniform router, whose slots change with the experts, a caller
 * racing expert changes can size them for more slots and read each row up to its first -1 (a call that finds more
 * slots than the rows hold fails with PHATGOOSE_STATUS_SHAPE, writing nothing). With tokens == 0 nothing is read or
 * written and the pointers may be NULL. Results equal `phatgoose apply` bit for bit.
 * Non-finite inputs: a token whose input row holds a NaN or infinite value (routing per sequence with the
 * PHATGOOSE or Arrow router: whose sequence holds one; with Arrow, also a row so large that its scores overflow) is
 * not routed: its experts are -1 and its weights NaN in every slot, and nothing is added to its output row. The
 * other tokens are applied as usual and the call returns PHATGOOSE_STATUS_NON_FINITE_INPUT, the message naming how
 * many tokens and the first. Finding them costs nothing extra (the routing scores show them), except with the
 * uniform router (one pass over the input).
 * On any other failure nothing is written.
 * Thread safety: any thread; any number of calls at once on one runtime (they take turns on its executor; more
 * than max_queued_calls at once get PHATGOOSE_STATUS_OVERLOADED). Buffers must not be touched by others during
 * the call. */
phatgoose_status phatgoose_runtime_apply(phatgoose_runtime *runtime, const phatgoose_layer *layer,
                                         const float *input, size_t tokens, size_t input_count,
                                         float *output, size_t output_count,
                                         int32_t *experts, float *weights, size_t routing_count);

/* One layer's part of phatgoose_runtime_apply_layers: its output and (optional) routing buffers, sized as for
 * phatgoose_runtime_apply. */
typedef struct phatgoose_layer_output {
    const phatgoose_layer *layer;
    float *output;
    size_t output_count;
    int32_t *experts;
    float *weights;
    size_t routing_count;
} phatgoose_layer_output;

/* Several layers that share one input (q, k and v of one attention block; every layer must have the same input
 * width): one admission and one turn of the executor, each layer's delta added into its own output. Either every
 * entry has routing buffers or none has. Checks every entry before doing any work. Non-finite input rows are
 * handled as by phatgoose_runtime_apply, in every layer (PHATGOOSE_STATUS_NON_FINITE_INPUT names the first layer).
 * Thread safety: as phatgoose_runtime_apply. */
phatgoose_status phatgoose_runtime_apply_layers(phatgoose_runtime *runtime, const float *input, size_t tokens,
                                                size_t input_count, const phatgoose_layer_output *layers,
                                                size_t layer_count);

/* ---------------------------------------------------------------------------------------------------------------
 * Distributed runtime (MPI; docs/scale-out.md)
 * ------------------------------------------------------------------------------------------------------------ */

/* 1 when this build has MPI (OpenMPI was found when it was built), else 0. Thread safety: any thread, any time. */
int phatgoose_mpi_available(void);

/* On rank 0 of the MPI world this process belongs to (started by mpirun; alone, a world of one rank), opens the
 * library at `path`, shards its experts over the ranks and waits until every rank holds its share; every other rank
 * must run `phatgoose serve-experts --library L` (same library). top_k 0: the library's. memory_cap_bytes 0: none;
 * else the most expert weights one rank may hold (PHATGOOSE_STATUS_MEMORY_CAP names the ranks over it).
 * replicate_hot: the costliest experts held by every rank. timeout_seconds <= 0: 30; the most a call waits for a
 * rank (PHATGOOSE_STATUS_TIMEOUT after). MPI is initialised on first use and finalised by
 * phatgoose_distributed_destroy, so one process opens at most one distributed runtime.
 * PHATGOOSE_STATUS_UNAVAILABLE in a build without MPI; PHATGOOSE_STATUS_INVALID_ARGUMENT on a rank other than 0.
 * Thread safety: any thread; not concurrently with another open or destroy. */
phatgoose_status phatgoose_distributed_open(const char *path, size_t top_k, uint64_t memory_cap_bytes, size_t replicate_hot,
                                            double timeout_seconds, phatgoose_distributed **runtime);

/* Stops the serving ranks, finalises MPI and destroys the handle (NULL: nothing). After a timeout it ends every
 * rank of the world instead (a stuck rank would hold MPI's finalisation for ever), and so the process.
 * Thread safety: any thread, once no call on the runtime is running. */
phatgoose_status phatgoose_distributed_destroy(phatgoose_distributed *runtime);

/* The number of ranks of the runtime's world. Thread safety: any thread. */
phatgoose_status phatgoose_distributed_rank_count(const phatgoose_distributed *runtime, size_t *ranks);

/* What rank `rank` holds: bytes of expert weights (lora_A and lora_B) and experts. Thread safety: any thread. */
phatgoose_status phatgoose_distributed_rank_share(const phatgoose_distributed *runtime, size_t rank, uint64_t *resident_bytes,
                                                  size_t *experts);

/* The module named `name`: its index (for phatgoose_distributed_apply), widths and output slots per token. Any
 * output pointer may be NULL. PHATGOOSE_STATUS_NOT_FOUND for an unknown name. Thread safety: any thread. */
phatgoose_status phatgoose_distributed_module(const phatgoose_distributed *runtime, const char *name, size_t *index,
                                              size_t *in_width, size_t *out_width, size_t *slots);

/* Routes `tokens` rows of `input` ([tokens, in], input_count == tokens * in) at module `module` and ADDS the mixture
 * delta into `output` ([tokens, out], output_count == tokens * out); `experts` and `weights` (both or neither,
 * routing_count == tokens * slots) receive each token's choices as phatgoose_runtime_apply gives them. The bits
 * equal phatgoose_runtime_apply's and `phatgoose apply`'s. With tokens == 0 nothing is read or written.
 * Thread safety: any thread; calls take turns (one exchange with the ranks at a time). */
phatgoose_status phatgoose_distributed_apply(phatgoose_distributed *runtime, size_t module, const float *input, size_t tokens,
                                             size_t input_count, float *output, size_t output_count, int32_t *experts,
                                             float *weights, size_t routing_count);

#ifdef __cplusplus
}
#endif

#endif /* PHATGOOSE_H */

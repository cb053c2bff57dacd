/*
 * route: open an expert library, route a batch of token activations at one or more layers, print a checksum of the
 * results and each token's chosen experts.
 *
 *   route LIBRARY [--layer NAME]... [--tokens T] [--seed S] [--top-k K] [--router NAME] [--save-input FILE]
 *
 * The batch is generated (a fixed pseudo-random sequence, the same for the same seed) so the program needs nothing
 * but the library. --save-input writes it as a safetensors file keyed by layer name, which is what
 * `phatgoose apply --input` takes: the checksums printed here then equal those of `phatgoose apply`'s output
 * (see docs/embedding.md). One --layer uses phatgoose_runtime_apply; several (sharing an input width, such as the
 * q, k and v of one attention block) use phatgoose_runtime_apply_layers. Without --layer, the library's first
 * module is used.
 *
 * The checksum is FNV-1a (64-bit) over the bytes of the layer's delta [T, out] (float32), then its experts [T, k]
 * (int32), then its weights [T, k] (float32), in native (little-endian) byte order.
 *
 * Build (after scripts/install.sh):  cc -std=c99 -O2 route.c -lphatgoose -o route
 */
#include <phatgoose.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LAYERS 16

/* Reports a failed call with the library's message and exits. */
static void check(phatgoose_status status, const char *what) {
    if (status != PHATGOOSE_STATUS_OK) {
        fprintf(stderr, "route: %s: %s: %s\n", what, phatgoose_status_name(status), phatgoose_last_error_message());
        exit(1);
    }
}

static void *allocate(size_t count, size_t size) {
    void *p = calloc(count > 0 ? count : 1, size);
    if (p == NULL) {
        fprintf(stderr, "route: out of memory\n");
        exit(1);
    }
    return p;
}

/* xorshift64*: uniform floats in [-1, 1) with 24 bits, exactly representable, identical on every machine. */
static float next_uniform(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    uint64_t bits = *state * UINT64_C(2685821657736338717);
    return (float)(int32_t)((bits >> 40) & 0xFFFFFF) / 8388608.0f - 1.0f;
}

static uint64_t fnv1a(uint64_t hash, const void *data, size_t bytes) {
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < bytes; i++) {
        hash ^= p[i];
        hash *= UINT64_C(1099511628211);
    }
    return hash;
}

/* Writes `x` once per layer name, as the F32 tensors of a safetensors file. */
static int save_input(const char *path, const char *const *names, size_t count, const float *x, size_t tokens, size_t width) {
    size_t bytes = tokens * width * sizeof(float), i, header_length, padded;
    char *header = (char *)allocate(256 + count * 512, 1);
    size_t used = 0;
    FILE *f;
    used += (size_t)sprintf(header + used, "{");
    for (i = 0; i < count; i++) {
        if (strlen(names[i]) > 400 || strpbrk(names[i], "\"\\") != NULL) {
            fprintf(stderr, "route: --save-input: layer name %s cannot be written\n", names[i]);
            free(header);
            return 1;
        }
        used += (size_t)sprintf(header + used, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%lu,%lu],\"data_offsets\":[%lu,%lu]}",
                                i > 0 ? "," : "", names[i], (unsigned long)tokens, (unsigned long)width,
                                (unsigned long)(i * bytes), (unsigned long)((i + 1) * bytes));
    }
    used += (size_t)sprintf(header + used, "}");
    header_length = used;
    padded = (header_length + 7) / 8 * 8;
    while (used < padded) header[used++] = ' ';
    f = fopen(path, "wb");
    if (f == NULL) {
        fprintf(stderr, "route: --save-input: cannot write %s\n", path);
        free(header);
        return 1;
    }
    {
        unsigned char length[8];
        uint64_t n = (uint64_t)padded;
        for (i = 0; i < 8; i++) length[i] = (unsigned char)(n >> (8 * i));
        fwrite(length, 1, 8, f);
    }
    fwrite(header, 1, padded, f);
    for (i = 0; i < count; i++) fwrite(x, 1, bytes, f);
    free(header);
    if (fclose(f) != 0) {
        fprintf(stderr, "route: --save-input: cannot write %s\n", path);
        return 1;
    }
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: route LIBRARY [--layer NAME]... [--tokens T] [--seed S] [--top-k K] [--router phatgoose|arrow|uniform] "
                    "[--save-input FILE]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *library_path = NULL, *save_path = NULL;
    const char *layer_names[MAX_LAYERS];
    char first_module[1024];
    size_t layer_count = 0, tokens = 16, i, t, j;
    uint64_t seed = 1, state;
    phatgoose_runtime_options options;
    phatgoose_runtime *runtime = NULL;
    phatgoose_library *served = NULL;
    phatgoose_layer *layers[MAX_LAYERS];
    phatgoose_layer_output outputs[MAX_LAYERS];
    size_t in_width = 0, out_width[MAX_LAYERS], slots[MAX_LAYERS], experts = 0, modules = 0;
    float *x;
    uint64_t calls = 0, total_tokens = 0, rejected = 0, *per_expert;
    int a;

    check(phatgoose_runtime_options_init(&options, sizeof options), "options");
    for (a = 1; a < argc; a++) {
        if (strcmp(argv[a], "--layer") == 0 && a + 1 < argc) {
            if (layer_count == MAX_LAYERS) usage();
            layer_names[layer_count++] = argv[++a];
        } else if (strcmp(argv[a], "--tokens") == 0 && a + 1 < argc) {
            tokens = (size_t)strtoul(argv[++a], NULL, 10);
        } else if (strcmp(argv[a], "--seed") == 0 && a + 1 < argc) {
            seed = (uint64_t)strtoull(argv[++a], NULL, 10);
        } else if (strcmp(argv[a], "--top-k") == 0 && a + 1 < argc) {
            options.top_k = (int32_t)strtol(argv[++a], NULL, 10);
        } else if (strcmp(argv[a], "--router") == 0 && a + 1 < argc) {
            const char *name = argv[++a];
            if (strcmp(name, "phatgoose") == 0) options.router = PHATGOOSE_ROUTER_PHATGOOSE;
            else if (strcmp(name, "arrow") == 0) options.router = PHATGOOSE_ROUTER_ARROW;
            else if (strcmp(name, "uniform") == 0) options.router = PHATGOOSE_ROUTER_UNIFORM;
            else usage();
        } else if (strcmp(argv[a], "--save-input") == 0 && a + 1 < argc) {
            save_path = argv[++a];
        } else if (argv[a][0] != '-' && library_path == NULL) {
            library_path = argv[a];
        } else {
            usage();
        }
    }
    if (library_path == NULL) usage();
    if (phatgoose_abi_version() != PHATGOOSE_ABI_VERSION) {
        fprintf(stderr, "route: libphatgoose has ABI %u, this program was built for %u\n", (unsigned)phatgoose_abi_version(),
                (unsigned)PHATGOOSE_ABI_VERSION);
        return 1;
    }
    printf("phatgoose %s (ABI %u)\n", phatgoose_version(), (unsigned)phatgoose_abi_version());

    /* Open and serve the library; describe it through a library handle of what the runtime serves. */
    check(phatgoose_runtime_open(library_path, &options, &runtime), "open");
    check(phatgoose_runtime_library(runtime, &served), "library");
    check(phatgoose_library_expert_count(served, &experts), "experts");
    check(phatgoose_library_module_count(served, &modules), "modules");
    printf("library: %lu experts, %lu modules\n", (unsigned long)experts, (unsigned long)modules);
    if (layer_count == 0) {
        check(phatgoose_library_module_name(served, 0, first_module, sizeof first_module, NULL), "module name");
        layer_names[layer_count++] = first_module;
    }

    /* Resolve layer names to handles once; a serving loop would keep them. */
    for (i = 0; i < layer_count; i++) {
        size_t in = 0;
        check(phatgoose_layer_create(runtime, layer_names[i], &layers[i]), layer_names[i]);
        check(phatgoose_layer_shape(layers[i], &in, &out_width[i], &slots[i]), "shape");
        if (i > 0 && in != in_width) {
            fprintf(stderr, "route: layer %s takes %lu inputs, %s takes %lu: they cannot share one input\n", layer_names[i],
                    (unsigned long)in, layer_names[0], (unsigned long)in_width);
            return 1;
        }
        in_width = in;
        printf("layer %s: in %lu, out %lu, slots %lu\n", layer_names[i], (unsigned long)in, (unsigned long)out_width[i],
               (unsigned long)slots[i]);
    }

    /* The batch: [tokens, in]. */
    x = (float *)allocate(tokens * in_width, sizeof(float));
    state = seed * UINT64_C(0x9E3779B97F4A7C15) + 1;
    for (i = 0; i < tokens * in_width; i++) x[i] = next_uniform(&state);
    printf("input: %lu tokens, seed %lu\n", (unsigned long)tokens, (unsigned long)seed);
    if (save_path != NULL && save_input(save_path, layer_names, layer_count, x, tokens, in_width) != 0) return 1;

    /* Outputs start at zero: apply adds the mixture delta into them. */
    for (i = 0; i < layer_count; i++) {
        outputs[i].layer = layers[i];
        outputs[i].output_count = tokens * out_width[i];
        outputs[i].output = (float *)allocate(outputs[i].output_count, sizeof(float));
        outputs[i].routing_count = tokens * slots[i];
        outputs[i].experts = (int32_t *)allocate(outputs[i].routing_count, sizeof(int32_t));
        outputs[i].weights = (float *)allocate(outputs[i].routing_count, sizeof(float));
    }
    if (layer_count == 1) {
        check(phatgoose_runtime_apply(runtime, layers[0], x, tokens, tokens * in_width, outputs[0].output, outputs[0].output_count,
                                      outputs[0].experts, outputs[0].weights, outputs[0].routing_count),
              "apply");
    } else {
        check(phatgoose_runtime_apply_layers(runtime, x, tokens, tokens * in_width, outputs, layer_count), "apply layers");
    }

    for (i = 0; i < layer_count; i++) {
        uint64_t hash = UINT64_C(14695981039346656037);
        hash = fnv1a(hash, outputs[i].output, outputs[i].output_count * sizeof(float));
        hash = fnv1a(hash, outputs[i].experts, outputs[i].routing_count * sizeof(int32_t));
        hash = fnv1a(hash, outputs[i].weights, outputs[i].routing_count * sizeof(float));
        printf("checksum %s: %016llx\n", layer_names[i], (unsigned long long)hash);
    }
    /* The first layer's choices, token by token. */
    for (t = 0; t < tokens; t++) {
        printf("token %lu: experts", (unsigned long)t);
        for (j = 0; j < slots[0]; j++) printf(" %d", (int)outputs[0].experts[t * slots[0] + j]);
        printf(", weights");
        for (j = 0; j < slots[0]; j++) printf(" %.6f", (double)outputs[0].weights[t * slots[0] + j]);
        printf("\n");
    }

    per_expert = (uint64_t *)allocate(experts, sizeof(uint64_t));
    check(phatgoose_runtime_statistics(runtime, &calls, &total_tokens, &rejected, per_expert, experts, &experts), "statistics");
    printf("statistics: calls %llu, tokens %llu, rejected %llu; tokens per expert:", (unsigned long long)calls,
           (unsigned long long)total_tokens, (unsigned long long)rejected);
    for (i = 0; i < experts; i++) printf(" %llu", (unsigned long long)per_expert[i]);
    printf("\n");

    /* Destroying the runtime also destroys its layers; destroying them first is equally fine. */
    for (i = 0; i < layer_count; i++) {
        check(phatgoose_layer_destroy(layers[i]), "layer destroy");
        free(outputs[i].output);
        free(outputs[i].experts);
        free(outputs[i].weights);
    }
    check(phatgoose_library_destroy(served), "library destroy");
    check(phatgoose_runtime_destroy(runtime), "runtime destroy");
    free(per_expert);
    free(x);
    return 0;
}

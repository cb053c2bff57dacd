#!/usr/bin/env python3
"""One PHATGOOSE routed layer in PyTorch on CPU, the way the official implementation computes it.

The official implementation (r-three/phatgoose, src/models/addons/moe.py, Router with score_type="original",
scaling_scores=True, and FFNExperts with topk_value=2, normalize_topk=True) does, per routed layer:

    xn      = LayerNorm(x)            no affine, eps 1e-5, over the feature axis
    gn      = LayerNorm(G)            G: the stacked gate vectors [N, d], normalised at every forward
    p       = softmax(xn @ gn^T / sqrt(d))
    w, idx  = topk(p, k);  w = w / (sum w + 1e-6)
    sort the T*k (token, expert) assignments by expert, gather the token rows, run one pair of matmuls per expert
    (x_e @ A_e^T @ B_e^T), multiply each row by its weight (and the LoRA scale), index_add_ the rows into [T, out].

This script times exactly that sequence of torch operations (written here from the math, not copied) for the
canonical workloads W1-W4 of shared/DESIGN.md section 5, and reports median and p90 microseconds per call and
GFLOP/s with the flop count Phatgoose's `phatgoose bench` uses:

    flops = 5*T*d + 2*T*N*d + T*k*(2*r*d + 2*r*o + o)

Data: by default "tasks" activations built like Phatgoose's synthetic library (PhatgooseSynth): ceil(N/4) tasks,
experts dealt to tasks round-robin, gate = task direction + 0.5*noise, tokens in sequences of 64, each sequence drawn
from one task with Zipf(1) popularity, token = 0.5*common + task direction + noise; so routing is skewed the way a
real model's is (few experts get most tokens). `--data random` uses i.i.d. normal tokens and gates instead.
`--library DIR --activations FILE` loads a Phatgoose/PEFT library and an activations file instead (for example
from `phatgoose synth`), and `--reference Y.safetensors` (the output of `phatgoose apply` on the same files) checks
this implementation's result against Phatgoose's.

Run with a torch install (see README.md):  python3 torch_routed_layer.py --threads 2 [--format json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError as error:  # pragma: no cover - reported to the user
    print(f"torch_routed_layer.py: cannot import torch ({error}); see Benchmarks/peers/README.md", file=sys.stderr)
    sys.exit(1)

# name: (in width, out width, experts, tokens), k = 2, rank 16 (shared/DESIGN.md section 5)
WORKLOADS = {
    "W1": (2048, 2048, 36, 512),
    "W2": (2048, 2048, 166, 512),
    "W3": (2048, 2048, 166, 8),
    "W4": (5120, 2048, 166, 512),
}
TOP_K = 2
RANK = 16
LORA_ALPHA = 1.0  # official scaling 1/16 at r = 16
LN_EPS = 1e-5
TOPK_EPS = 1e-6
SEQUENCE_LENGTH = 64


def workload_flops(tokens: int, d_in: int, d_out: int, experts: int, k: int, rank: int) -> float:
    """The flop count of `phatgoose bench` (PhatgooseSynth.Workload.flops)."""
    t, d, o, r = float(tokens), float(d_in), float(d_out), float(rank)
    assignments = t * min(k, experts)
    return 5 * t * d + 2 * t * experts * d + assignments * (2 * r * d + 2 * r * o + o)


# ---------------------------------------------------------------------------------------------------------------
# The routed layer


class RoutedLayer:
    """Holds one layer's gates and expert weights in the official layout and computes the routed LoRA mixture.

    Weights are kept as the official FFNExperts keeps them: layer1 = A^T [N, d_in, r], layer2 = B^T [N, r, d_out]
    (transposed once at load time, so x_e @ layer1[e] @ layer2[e] == x_e @ A_e^T @ B_e^T).
    """

    def __init__(self, gates: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float],
                 k: int, dtype: torch.dtype, loop: str = "active"):
        self.experts, self.d_in = gates.shape
        self.d_out = b[0].shape[0]
        self.k = min(k, self.experts)
        self.dtype = dtype
        self.loop = loop
        self.gates = gates.float().contiguous()
        self.layer1 = [ai.t().contiguous().to(dtype) for ai in a]      # [d_in, r_e]
        self.layer2 = [bi.t().contiguous().to(dtype) for bi in b]      # [r_e, d_out]
        self.scales = torch.tensor(scales, dtype=torch.float32)
        self.inv_sqrt_d = 1.0 / math.sqrt(self.d_in)
        self.last_counts: list[int] = []

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices [T, k] (int64) and renormalised weights [T, k] (f32)."""
        xn = F.layer_norm(x, (self.d_in,), eps=LN_EPS)
        gn = F.layer_norm(self.gates, (self.d_in,), eps=LN_EPS)
        scores = torch.matmul(xn, gn.t()) * self.inv_sqrt_d
        probs = torch.softmax(scores, dim=-1)
        weights, indices = torch.topk(probs, self.k, dim=-1)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + TOPK_EPS)
        return indices, weights

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixture delta [T, d_out] f32 (without the base layer's W x), and the routing (indices, weights)."""
        tokens = x.shape[0]
        indices, weights = self.route(x)
        # Dispatch: the T*k assignments sorted by expert (stable, so tokens stay in order within an expert).
        flat_experts = indices.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = torch.div(order, self.k, rounding_mode="floor")
        row_scale = weights.reshape(-1)[order] * self.scales[flat_experts[order]]
        counts = torch.bincount(flat_experts, minlength=self.experts).tolist()
        self.last_counts = counts
        gathered = x.index_select(0, token_of)
        if self.dtype != torch.float32:
            gathered = gathered.to(self.dtype)
        stitched = torch.empty(tokens * self.k, self.d_out, dtype=self.dtype)
        start = 0
        for e, count in enumerate(counts):
            if count == 0 and self.loop == "active":
                continue
            end = start + count
            hidden = torch.matmul(gathered[start:end], self.layer1[e])         # [n_e, r]
            torch.matmul(hidden, self.layer2[e], out=stitched[start:end])      # [n_e, d_out]
            start = end
        if self.dtype != torch.float32:
            stitched = stitched.float()
        stitched.mul_(row_scale.unsqueeze(1))
        out = torch.zeros(tokens, self.d_out, dtype=torch.float32)
        out.index_add_(0, token_of, stitched)
        return out, indices, weights

    def dense_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Straightforward per-token f32 reference: sum over chosen experts of w * scale * B (A x)."""
        indices, weights = self.route(x)
        out = torch.zeros(x.shape[0], self.d_out, dtype=torch.float32)
        for t in range(x.shape[0]):
            for j in range(self.k):
                e = int(indices[t, j])
                h = x[t:t + 1] @ self.layer1[e].float()
                out[t] += float(weights[t, j]) * float(self.scales[e]) * (h @ self.layer2[e].float())[0]
        return out


# ---------------------------------------------------------------------------------------------------------------
# Data


def zipf_choice(generator: torch.Generator, tasks: int, count: int, exponent: float = 1.0) -> torch.Tensor:
    weights = torch.tensor([1.0 / (i + 1) ** exponent for i in range(tasks)], dtype=torch.float64)
    return torch.multinomial(weights / weights.sum(), count, replacement=True, generator=generator)


def synthetic_layer(d_in: int, d_out: int, experts: int, tokens: int, data: str, seed: int):
    """Gates [N, d], A list of [r, d], B list of [o, r], scales, activations [T, d] (all f32)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d_in)
    a = [torch.empty(RANK, d_in).uniform_(-bound, bound, generator=g) for _ in range(experts)]
    b = [torch.empty(d_out, RANK).uniform_(-0.02, 0.02, generator=g) for _ in range(experts)]
    scales = [LORA_ALPHA / RANK] * experts
    if data == "random":
        gates = torch.randn(experts, d_in, generator=g)
        x = torch.randn(tokens, d_in, generator=g)
        return gates, a, b, scales, x
    tasks = max(1, (experts + 3) // 4)
    directions = torch.randn(tasks, d_in, generator=g)
    expert_task = torch.arange(experts) % tasks
    gates = directions[expert_task] + 0.5 * torch.randn(experts, d_in, generator=g)
    sequence_length = min(tokens, SEQUENCE_LENGTH)
    sequences = (tokens + sequence_length - 1) // sequence_length
    sequence_task = zipf_choice(g, tasks, sequences)
    token_task = sequence_task.repeat_interleave(sequence_length)[:tokens]
    common = torch.randn(d_in, generator=g)
    x = 0.5 * common + directions[token_task] + torch.randn(tokens, d_in, generator=g)
    return gates, a, b, scales, x


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
              "I64": torch.int64, "F64": torch.float64}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A minimal safetensors reader (8-byte little-endian header length, JSON header, raw little-endian data)."""
    with open(path, "rb") as handle:
        blob = handle.read()
    (header_length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_length])
    base = 8 + header_length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        raw = bytearray(blob[base + begin:base + end])
        tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = tensor.reshape(info["shape"])
    return tensors


def library_layer(library: str, module: str | None, activations: str):
    """Loads one module of a Phatgoose/PEFT library directory and its activations."""
    manifest_path = os.path.join(library, "library.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as handle:
            names = [entry["path"] for entry in json.load(handle)["experts"]]
    else:
        names = sorted(n for n in os.listdir(library) if os.path.exists(os.path.join(library, n, "adapter_config.json")))
    x_all = read_safetensors(activations)
    if module is None:
        module = sorted(x_all)[0]
    x = x_all[module].float()
    gates, a, b, scales, kept = [], [], [], [], []
    for index, name in enumerate(names):
        directory = os.path.join(library, name)
        weights = read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
        key = f"base_model.model.{module}.lora_A.weight"
        if key not in weights:
            continue  # this expert does not adapt the module: not a candidate here
        with open(os.path.join(directory, "adapter_config.json")) as handle:
            config = json.load(handle)
        rank = weights[key].shape[0]
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        a.append(weights[key].float())
        b.append(weights[f"base_model.model.{module}.lora_B.weight"].float())
        gates.append(read_safetensors(os.path.join(directory, "gates.safetensors"))[module].float())
        scales.append(scale)
        kept.append(index)
    return module, torch.stack(gates), a, b, scales, x, kept


# ---------------------------------------------------------------------------------------------------------------
# Timing


def time_calls(call, seconds: float, warmup_seconds: float) -> list[float]:
    """Seconds per call: warm-up, then calls until `seconds` have elapsed (at least 10 calls)."""
    end = time.perf_counter() + warmup_seconds
    call()
    while time.perf_counter() < end:
        call()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 10 or time.perf_counter() < deadline:
        begin = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - begin) * 1e-9)
    return sorted(times)


def measure(name: str, layer: RoutedLayer, x: torch.Tensor, rank: int, seconds: float, warmup: float) -> dict:
    tokens = x.shape[0]
    layer(x)
    counts = layer.last_counts
    times = time_calls(lambda: layer(x), seconds, warmup)
    median = times[len(times) // 2]
    p90 = times[min(len(times) - 1, len(times) * 9 // 10)]
    flops = workload_flops(tokens, layer.d_in, layer.d_out, layer.experts, layer.k, rank)
    return {
        "workload": name,
        "dtype": {torch.float32: "f32", torch.bfloat16: "bf16"}[layer.dtype],
        "us_per_call_median": median * 1e6,
        "us_per_call_p90": p90 * 1e6,
        "gflops": flops / median / 1e9,
        "calls": len(times),
        "tokens": tokens,
        "experts": layer.experts,
        "active_experts": sum(1 for c in counts if c > 0),
        "max_tokens_per_expert": max(counts),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                        help="canonical workload (repeatable; default W1 W2 W3 W4)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--dtype", default="f32",
                        help="expert weight dtype(s), comma-separated: f32, bf16 (bf16: expert matmuls in bf16, "
                             "routing and accumulation in f32)")
    parser.add_argument("--seconds", type=float, default=1.0, help="measured seconds per workload (default 1)")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up seconds per workload (default 0.3)")
    parser.add_argument("--data", choices=["tasks", "random"], default="tasks",
                        help="tasks: skewed, task-clustered routing like a real model (default); random: i.i.d.")
    parser.add_argument("--loop", choices=["active", "all"], default="active",
                        help="active: matmuls only for experts that got tokens (default); all: one (maybe empty) "
                             "matmul pair per expert, like the official loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="also compare the routed result with a per-token reference (first 32 tokens)")
    parser.add_argument("--library", help="Phatgoose/PEFT library directory instead of a canonical workload")
    parser.add_argument("--activations", help="with --library: activations .safetensors (key <module>, [T, in])")
    parser.add_argument("--module", help="with --library: the module to run (default: first key of --activations)")
    parser.add_argument("--reference", help="with --library: `phatgoose apply` output to compare against")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    args = parser.parse_args()

    if args.threads < 1:
        parser.error("--threads: expected at least 1")
    dtypes = []
    for spelling in args.dtype.split(","):
        if spelling not in ("f32", "bf16"):
            parser.error(f"--dtype: expected f32 or bf16, found {spelling}")
        dtypes.append(torch.float32 if spelling == "f32" else torch.bfloat16)
    if args.library and not args.activations:
        parser.error("--library needs --activations")

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    results, checks = [], []
    with torch.inference_mode():
        cases = []
        if args.library:
            module, gates, a, b, scales, x, kept = library_layer(args.library, args.module, args.activations)
            cases.append((f"library:{module}", gates, a, b, scales, x, module, kept))
        else:
            for name in args.workload or ["W1", "W2", "W3", "W4"]:
                d_in, d_out, experts, tokens = WORKLOADS[name]
                gates, a, b, scales, x = synthetic_layer(d_in, d_out, experts, tokens, args.data, args.seed)
                cases.append((name, gates, a, b, scales, x, None, None))
        for name, gates, a, b, scales, x, module, kept in cases:
            for dtype in dtypes:
                layer = RoutedLayer(gates, a, b, scales, TOP_K, dtype, args.loop)
                rank = a[0].shape[0]
                if args.check:
                    rows = x[:32]
                    got, _, _ = layer(rows)
                    want = layer.dense_reference(rows)
                    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                    checks.append({"workload": name, "dtype": str(dtype).split(".")[-1], "max_rel_error": error})
                if args.reference and dtype == torch.float32:
                    reference = read_safetensors(args.reference)
                    got, indices, weights = layer(x)
                    want = reference[module].float()
                    want_experts = reference[f"{module}.experts"].long()
                    mine = torch.tensor(kept)[indices] if kept is not None else indices
                    same = (torch.sort(mine, dim=1).values == torch.sort(want_experts, dim=1).values).all(dim=1)
                    checks.append({
                        "workload": name, "dtype": "f32", "against": args.reference,
                        "max_abs_error": float((got - want).abs().max()),
                        "max_abs_value": float(want.abs().max()),
                        "tokens_same_experts": int(same.sum()), "tokens": int(x.shape[0]),
                    })
                results.append(measure(name, layer, x, rank, args.seconds, args.warmup))
                del layer

    document = {
        "impl": "torch",
        "torch_version": torch.__version__,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "data": "library" if args.library else args.data,
        "loop": args.loop,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "results": results,
    }
    if checks:
        document["checks"] = checks
    if args.format == "json":
        print(json.dumps(document, indent=1))
    else:
        print(f"torch {torch.__version__} ({document['cpu_capability']}), {args.threads} threads, "
              f"data {document['data']}, loop {args.loop}")
        print(f"{'workload':<10} {'dtype':<5} {'median us':>10} {'p90 us':>10} {'GFLOP/s':>8} {'calls':>6} "
              f"{'active':>6} {'max/expert':>10}")
        for r in results:
            print(f"{r['workload']:<10} {r['dtype']:<5} {r['us_per_call_median']:>10.1f} {r['us_per_call_p90']:>10.1f} "
                  f"{r['gflops']:>8.2f} {r['calls']:>6} {r['active_experts']:>6} {r['max_tokens_per_expert']:>10}")
        for c in checks:
            print("check: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Seeded random PHATGOOSE expert libraries (and matching activations) in the DESIGN.md §2 layout.

    LIB/library.json                         optional manifest (expert order = expert index)
    LIB/<expert>/adapter_config.json         PEFT LoRA config
    LIB/<expert>/adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, d_in], ...lora_B.weight [d_out, r]
    LIB/<expert>/gates.safetensors           <module> [d_in]

Routing is made non-trivial on purpose. Per module there are a few random "cluster" directions u_c (norm
sqrt(d_in)). Expert i belongs to one cluster; its gate is u_c + unit-variance noise + a constant offset, and the
top right-singular direction of its B @ A is (u_c + noise) normalised, with a clear spectral gap (sigma_2/sigma_1
about 0.6), so PHATGOOSE and Arrow both prefer the experts of the token's cluster, and within a cluster the
per-expert noise decides. Activations are c_t * 1 + s_t * (u_{cluster(t)} + 1.5 * noise): the per-token offset
and scale exercise the LayerNorm.

Library use:  info = generate_library(dir, n_experts=..., modules=[(name, d_in, d_out), ...], ...)
              X = make_inputs(info, {module: T, ...}, seed=...)
CLI:          make_library.py OUT_DIR --experts 8 --blocks 1 --d-model 64 --d-ff 128 [--inputs X.safetensors --tokens 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phatgoose_ref as ref  # noqa: E402


def t5_modules(blocks=(0,), d_model=64, d_ff=128, decoder=False, attention=("q", "k", "v", "o"),
               ffn=("wi", "wo")) -> list:
    """Realistic T5 module names with their (d_in, d_out)."""
    out = []
    for b in blocks:
        for stack in (("encoder", "decoder") if decoder else ("encoder",)):
            layers = [(0, "SelfAttention")]
            if stack == "decoder":
                layers.append((1, "EncDecAttention"))
            for li, kind in layers:
                for proj in attention:
                    out.append((f"{stack}.block.{b}.layer.{li}.{kind}.{proj}", d_model, d_model))
            ffn_layer = 2 if stack == "decoder" else 1
            for proj in ffn:
                if proj == "wi":
                    out.append((f"{stack}.block.{b}.layer.{ffn_layer}.DenseReluDense.wi", d_model, d_ff))
                else:
                    out.append((f"{stack}.block.{b}.layer.{ffn_layer}.DenseReluDense.wo", d_ff, d_model))
    return out


@dataclass
class LibraryInfo:
    path: str
    names: list                  # expert names in expert-index order
    modules: list                # [(name, d_in, d_out)]
    has: dict                    # expert name -> set of modules it adapts
    clusters: dict = field(default_factory=dict)   # module -> [C, d_in] cluster directions (norm sqrt(d_in))
    seed: int = 0

    def candidates(self, module):
        return [i for i, n in enumerate(self.names) if module in self.has[n]]


def _unit(v):
    return v / np.linalg.norm(v)


def _spectrum(r):
    if r == 1:
        return np.ones(1)
    return np.concatenate([[1.0], np.linspace(0.6, 0.1, r - 1)])


def _lora_pair(rng, d_in, d_out, r, direction):
    """A [r, d_in], B [d_out, r] with top right-singular vector of B A close to `direction`."""
    sig = _spectrum(r)
    if r <= min(d_in, d_out):
        m = rng.standard_normal((d_in, r))
        m[:, 0] = direction
        q, _ = np.linalg.qr(m)                    # q[:, 0] = +-direction
        A = sig[:, None] * q.T
        u, _ = np.linalg.qr(rng.standard_normal((d_out, r)))
        B = u + 0.1 * rng.standard_normal((d_out, r)) / math.sqrt(d_out)
    else:                                          # rank above a width: plain random factors
        A = sig[:, None] * rng.standard_normal((r, d_in)) / math.sqrt(d_in)
        A[0] += direction
        B = rng.standard_normal((d_out, r)) / math.sqrt(d_out)
    return A, B


def generate_library(out_dir, *, n_experts, modules, rank=16, alpha=1.0, use_rslora=False, rank_pattern=None,
                     alpha_pattern=None, weight_dtype="F32", gate_dtype="F32", skip=None, manifest=True,
                     routing=None, names=None, seed=0, n_clusters=None, target_style="short") -> LibraryInfo:
    """Writes a library and returns its LibraryInfo.

    skip: None; a dict {expert position: [module names]} (positions in `names` order); or a float probability
          that each (expert, module) pair is left out (every module keeps at least one expert).
    names: expert directory names in manifest order (default e000, e001, ...). Without a manifest the expert
          index is the byte order of the names, which LibraryInfo.names reflects.
    weight_dtype / gate_dtype: F32, F16 or BF16 (a single value, or a list per expert).
    target_style: "short" (q, k, wi, ...), "full" (full module names) — experts that skip modules always use
          full names so target_modules does not claim modules they lack.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    width = max(3, len(str(n_experts - 1)))
    names = list(names) if names is not None else [f"e{i:0{width}d}" for i in range(n_experts)]
    assert len(names) == n_experts and len(set(names)) == n_experts
    module_names = [m[0] for m in modules]
    has = {n: set(module_names) for n in names}
    if isinstance(skip, dict):
        for pos, mods in skip.items():
            has[names[pos]] -= set(mods)
    elif isinstance(skip, float) and skip > 0:
        for n in names:
            for m in module_names:
                if rng.random() < skip:
                    has[n].discard(m)
    for m in module_names:                          # keep at least one candidate everywhere
        if not any(m in has[n] for n in names):
            has[names[int(rng.integers(n_experts))]].add(m)

    C = n_clusters or max(2, min(8, n_experts // 2))
    clusters, member = {}, {}
    for name, d_in, _ in modules:
        dirs = rng.standard_normal((C, d_in))
        clusters[name] = dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * math.sqrt(d_in)
        member[name] = rng.integers(0, C, size=n_experts)

    short = sorted({m.rsplit(".", 1)[-1] for m in module_names})
    for pos, ename in enumerate(names):
        edir = os.path.join(out_dir, ename)
        os.makedirs(edir, exist_ok=True)
        wdt = weight_dtype[pos] if isinstance(weight_dtype, (list, tuple)) else weight_dtype
        gdt = gate_dtype[pos] if isinstance(gate_dtype, (list, tuple)) else gate_dtype
        mine = [m for m in modules if m[0] in has[ename]]
        full = target_style == "full" or len(mine) < len(modules)
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha,
            "use_rslora": use_rslora,
            "target_modules": [m[0] for m in mine] if full else short,
            "rank_pattern": dict(rank_pattern or {}),
            "alpha_pattern": dict(alpha_pattern or {}),
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "task_type": "SEQ_2_SEQ_LM",
        }
        with open(os.path.join(edir, "adapter_config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
        weights, gates = {}, {}
        for name, d_in, d_out in mine:
            r = int(ref.pattern_value(rank_pattern, name, rank))
            u = clusters[name][member[name][pos]]
            direction = _unit(u / math.sqrt(d_in) + 0.5 * rng.standard_normal(d_in) / math.sqrt(d_in))
            A, B = _lora_pair(rng, d_in, d_out, r, direction)
            weights[f"{ref.ADAPTER_PREFIX}{name}{ref.LORA_A_SUFFIX}"] = (A, wdt)
            weights[f"{ref.ADAPTER_PREFIX}{name}{ref.LORA_B_SUFFIX}"] = (B, wdt)
            gate = u + rng.standard_normal(d_in) + rng.normal(0.0, 0.5)
            gates[name] = (gate, gdt)
        ref.write_safetensors(os.path.join(edir, "adapter_model.safetensors"), weights)
        ref.write_safetensors(os.path.join(edir, "gates.safetensors"), gates)

    if manifest:
        doc = {"format": "phatgoose-library", "version": 1,
               "experts": [{"name": n, "path": n} for n in names],
               "routing": dict(routing or {"router": "phatgoose", "top_k": 2})}
        with open(os.path.join(out_dir, "library.json"), "w") as fh:
            json.dump(doc, fh, indent=2)
        order = names
    else:
        order = sorted(names, key=lambda n: n.encode("utf-8"))
    return LibraryInfo(path=out_dir, names=order, modules=list(modules), has=has, clusters=clusters, seed=seed)


def make_inputs(info: LibraryInfo, tokens, seed=0, run_length=1, zero_rows=0) -> dict:
    """{module: float32 [T, d_in]} near the library's cluster directions.

    tokens: an int (every module) or {module: T}. run_length: consecutive tokens share a cluster in runs of this
    length (makes per-sequence routing meaningful). zero_rows: that many all-zero rows (exact routing ties: every
    score is 0, so the lowest expert indices must win) placed at random positions.
    """
    rng = np.random.default_rng(seed + 7919)
    if isinstance(tokens, int):
        tokens = {m[0]: tokens for m in info.modules}
    out = {}
    for name, d_in, _ in info.modules:
        if name not in tokens:
            continue
        T = tokens[name]
        dirs = info.clusters[name]
        n_runs = -(-T // run_length) if T else 0
        which = np.repeat(rng.integers(0, dirs.shape[0], size=n_runs), run_length)[:T]
        offset = rng.normal(0.0, 1.0, size=(T, 1))
        scale = rng.uniform(0.5, 2.0, size=(T, 1))
        X = offset + scale * (dirs[which] + 1.5 * rng.standard_normal((T, d_in)))
        if zero_rows and T:
            X[rng.choice(T, size=min(zero_rows, T), replace=False)] = 0.0
        out[name] = X.astype(np.float32)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-ff", type=int, default=128)
    ap.add_argument("--decoder", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--rslora", action="store_true")
    ap.add_argument("--rank-pattern", default="{}", help="JSON dict")
    ap.add_argument("--alpha-pattern", default="{}", help="JSON dict")
    ap.add_argument("--weight-dtype", default="F32", choices=("F32", "F16", "BF16"))
    ap.add_argument("--gate-dtype", default="F32", choices=("F32", "F16", "BF16"))
    ap.add_argument("--skip", type=float, default=0.0, help="probability an expert skips a module")
    ap.add_argument("--no-manifest", action="store_true")
    ap.add_argument("--router", default="phatgoose")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inputs", help="also write activations here")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)
    mods = t5_modules(blocks=range(args.blocks), d_model=args.d_model, d_ff=args.d_ff, decoder=args.decoder)
    info = generate_library(args.out, n_experts=args.experts, modules=mods, rank=args.rank, alpha=args.alpha,
                            use_rslora=args.rslora, rank_pattern=json.loads(args.rank_pattern),
                            alpha_pattern=json.loads(args.alpha_pattern), weight_dtype=args.weight_dtype,
                            gate_dtype=args.gate_dtype, skip=args.skip, manifest=not args.no_manifest,
                            routing={"router": args.router, "top_k": args.top_k}, seed=args.seed)
    if args.inputs:
        ref.write_safetensors(args.inputs, make_inputs(info, args.tokens, seed=args.seed))
    print(f"wrote {len(info.names)} experts x {len(mods)} modules to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Writes the small golden fixtures into Tests/Fixtures/golden/<case>/ (run from anywhere):

    <case>/library/              a small library (DESIGN.md §2 layout)
    <case>/input.safetensors     F32 activations, one tensor per module, [T, d_in]
    <case>/expected.safetensors  the reference's `apply` output (float64 math, stored F32/I32)
    <case>/case.json             the apply options used, the exact CLI arguments, and the minimum score gap

Every routing decision in every case (except the deliberate exact tie of `tie_zero_row_k2`) has a score gap of at
least MIN_GAP between consecutive chosen experts and between the last chosen and the best unchosen one: the seed
is advanced until that holds. A gap of 1e-3 in scores is a 1e-3 relative gap in probabilities, ~8000 ulps of
float32, so any correct float32 implementation must reproduce the experts *and their slot order* exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import phatgoose_ref as ref  # noqa: E402
import make_library as ml  # noqa: E402

DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "Fixtures", "golden"))
MIN_GAP = 1e-3

Q = "encoder.block.0.layer.0.SelfAttention.q"
K = "encoder.block.0.layer.0.SelfAttention.k"
O = "encoder.block.0.layer.0.SelfAttention.o"
WI = "encoder.block.0.layer.1.DenseReluDense.wi"
WO = "encoder.block.0.layer.1.DenseReluDense.wo"


def mods(d_model, d_ff, attention=("q", "o")):
    return ml.t5_modules(d_model=d_model, d_ff=d_ff, attention=attention)


# name: (library kwargs, tokens, options, input kwargs, description)
CASES = {
    "phatgoose_k1_f32": (
        dict(n_experts=4, modules=mods(16, 32), rank=4, alpha=1.0),
        6, dict(router="phatgoose", top_k=1), {}, "PHATGOOSE, k=1, F32, manifest"),
    "phatgoose_k2_f32": (
        dict(n_experts=5, modules=mods(32, 48, ("q", "k", "o")), rank=8, alpha=1.0),
        {Q: 8, K: 1, O: 5, WI: 7, WO: 3}, dict(router="phatgoose", top_k=2), {},
        "PHATGOOSE, k=2, F32, manifest, T=1 on one module"),
    "phatgoose_k3_rslora_patterns": (
        dict(n_experts=6, modules=mods(24, 48), rank=8, alpha=16.0, use_rslora=True,
             rank_pattern={"wo": 4, "q": 2, "SelfAttention.q": 16},
             alpha_pattern={"wi": 32, r"SelfAttention\.(q|o)": 8}),
        7, dict(router="phatgoose", top_k=3), {},
        "PHATGOOSE, k=3, use_rslora, rank_pattern (first matching key in dict order wins: q -> 2, not 16) and "
        "alpha_pattern (a regex key)"),
    "phatgoose_k2_bf16": (
        dict(n_experts=4, modules=mods(32, 40), rank=4, alpha=8.0, weight_dtype="BF16", gate_dtype="BF16"),
        6, dict(router="phatgoose", top_k=2), {}, "PHATGOOSE, k=2, BF16 weights and gates"),
    "phatgoose_k3_skip_module": (
        dict(n_experts=5, modules=mods(16, 32), rank=4, alpha=4.0, weight_dtype="F16", gate_dtype="F16",
             skip={1: [Q], 0: [O], 2: [O], 3: [O]}),
        5, dict(router="phatgoose", top_k=3), {},
        "PHATGOOSE, k=3, F16; expert 1 lacks q; o has only 2 candidates (slot 3 padded with -1 / 0)"),
    "phatgoose_k2_no_manifest": (
        dict(n_experts=4, modules=mods(16, 24), rank=4, alpha=2.0, manifest=False,
             names=["lora_b", "Lora_Z", "lora_a", "_extra"], gate_dtype="BF16"),
        5, dict(router="phatgoose", top_k=2), {},
        "no library.json: experts are the subdirectories in byte order (Lora_Z, _extra, lora_a, lora_b)"),
    "arrow_k2": (
        dict(n_experts=4, modules=mods(16, 32), rank=4, alpha=1.0),
        6, dict(router="arrow", top_k=2), {}, "Arrow, default temperature 10, unscaled"),
    "arrow_scaled_t2_k2": (
        dict(n_experts=5, modules=mods(32, 48), rank=4, alpha=1.0, weight_dtype="BF16"),
        6, dict(router="arrow", top_k=2, arrow_temperature=2.0, arrow_scaled=True), {},
        "Arrow, --arrow-scaled, --arrow-temperature 2, BF16 weights"),
    "uniform": (
        dict(n_experts=3, modules=mods(16, 32), rank=4, alpha=1.0, skip={2: [WO]}),
        4, dict(router="uniform", top_k=2), {},
        "uniform: every candidate with weight 1/n (output width n; wo has 2 candidates, the others 3)"),
    "sequence_phatgoose_k2_L4": (
        dict(n_experts=4, modules=mods(16, 32), rank=4, alpha=1.0),
        {Q: 10, O: 4, WI: 3, WO: 9}, dict(router="phatgoose", top_k=2, granularity="sequence", sequence_length=4),
        dict(run_length=4), "per-sequence PHATGOOSE, L=4: sequences of 4 tokens, the last one shorter"),
    "tie_zero_row_k2": (
        dict(n_experts=4, modules=mods(16, 32), rank=4, alpha=1.0),
        5, dict(router="phatgoose", top_k=2), dict(zero_rows=1),
        "one all-zero token per module: every score is exactly 0, so the tie rule picks experts 0 and 1 "
        "with weight 0.25 / (0.5 + 1e-6) each, and the delta row is 0; all other tokens have clear margins"),
}


def full_options(opts: dict) -> ref.ApplyOptions:
    return ref.ApplyOptions(router=opts["router"], top_k=opts.get("top_k", 2),
                            granularity=opts.get("granularity", "token"),
                            sequence_length=opts.get("sequence_length"),
                            arrow_temperature=float(opts.get("arrow_temperature", 10.0)),
                            arrow_scaled=bool(opts.get("arrow_scaled", False)))


def min_gap(lib, inputs, options, allow_zero_rows=False):
    """Smallest score gap among the decisions that matter (consecutive chosen, last chosen vs best unchosen)."""
    if options.router == "uniform":
        return math.inf
    worst = math.inf
    for module, X in inputs.items():
        route = ref.route_module(lib, module, X, options)
        unit = route.unit
        Xr = ref.router_inputs(X.astype(np.float64), unit)
        zero = ~np.any(Xr != 0, axis=1)
        s = route.scores
        n = s.shape[1]
        k = min(options.top_k, n)
        ss = -np.sort(-s, axis=1)[:, :min(k + 1, n)]
        if ss.shape[1] < 2:
            continue
        gaps = (ss[:, :-1] - ss[:, 1:]).min(axis=1)
        if allow_zero_rows:
            gaps = gaps[~zero]
        if gaps.size:
            worst = min(worst, float(gaps.min()))
    return worst


def build(case, spec, out_root, base_seed):
    lib_kw, tokens, opts, in_kw, description = spec
    cdir = os.path.join(out_root, case)
    for attempt in range(200):
        seed = base_seed + 1000 * attempt
        shutil.rmtree(cdir, ignore_errors=True)
        libdir = os.path.join(cdir, "library")
        info = ml.generate_library(libdir, seed=seed, **lib_kw)
        inputs = ml.make_inputs(info, tokens, seed=seed, **in_kw)
        lib = ref.load_library(libdir)
        options = full_options(opts)
        gap = min_gap(lib, inputs, options, allow_zero_rows=bool(in_kw.get("zero_rows")))
        if gap >= MIN_GAP:
            break
    else:
        raise SystemExit(f"{case}: could not find a seed without near-ties")
    ref.write_safetensors(os.path.join(cdir, "input.safetensors"), inputs)
    expected = ref.apply(lib, inputs, options)
    ref.write_safetensors(os.path.join(cdir, "expected.safetensors"), expected)
    doc = dict(options.as_json())
    doc.update({
        "description": description,
        "args": options.cli_args(),
        "experts": info.names,
        "seed": seed,
        "min_score_gap": None if math.isinf(gap) else round(gap, 6),
        "tolerance": {"experts": "exact (including slot order)", "weights_abs": 1e-5,
                      "delta_row_rel": 1e-4},
    })
    with open(os.path.join(cdir, "case.json"), "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    return seed, gap


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for stale in os.listdir(args.out):
        if stale not in CASES and os.path.isdir(os.path.join(args.out, stale)):
            shutil.rmtree(os.path.join(args.out, stale))
    for i, (case, spec) in enumerate(CASES.items()):
        seed, gap = build(case, spec, args.out, base_seed=100 + i)
        print(f"{case}: seed {seed}, min score gap {gap:.4g}")
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {len(CASES)} cases to {args.out} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

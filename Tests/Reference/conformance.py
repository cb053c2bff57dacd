#!/usr/bin/env python3
"""Conformance harness: runs `PHATGOOSE_BINARY apply` on seeded random libraries and compares with the reference.

    conformance.py PHATGOOSE_BINARY [--quick] [--cases SUBSTR,...] [--any-order] [--keep] [--list]
    conformance.py PHATGOOSE_BINARY --golden      (the fixtures in Tests/Fixtures/golden, strict)
    conformance.py --self-test

PHATGOOSE_BINARY is a command string split with shlex, e.g. ".build/release/phatgoose" or
"python3 Tests/Reference/phatgoose_ref.py" (the reference CLI itself, which must pass), or
"python3 Tests/Reference/phatgoose_ref.py --float32" (the same math in float32: must pass too, which shows the
tolerances absorb honest float32 rounding). One line per case, then a line `N passed, M failed`; the exit code is
non-zero on any failure.

Agreement rules (per module, per token; the routing unit is the token, or its sequence with --granularity sequence):

* Shapes/dtypes: `<m>` F32 [T, d_out], `<m>.experts` I32 [T, k_out], `<m>.weights` F32 [T, k_out], with
  k_out = k (uniform: the module's candidate count n). Slots past k_eff = min(k, n) hold expert -1 and weight 0.
  Every value finite. No other tensors.
* Expert choice: the binary's set of k_eff experts must be distinct candidates and equal the reference's top-k set,
  except where the reference's probabilities that decide the choice are a near-tie (see TIE TOLERANCE below): a
  set is accepted when no unchosen candidate beats a chosen one by more than the tie tolerance.
  Slot order must be descending probability (ties in either order) unless --any-order.
  With per-sequence routing, all tokens of a sequence must carry identical experts.
* Weights: |w_bin - w_ref| <= 1e-5 (+ the float32 score-rounding term, see WEIGHTS below), where w_ref is computed
  from the reference probabilities *for the set the binary chose* (so an accepted near-tie does not spill over).
* Delta: per token row ||d_bin - d_ref|| / max(||d_ref||, 1e-6 * rms row norm of the module, 1e-30) <= 1e-4, d_ref
  computed in float64 with the binary's (accepted) experts and its (checked) weights.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import phatgoose_ref as ref  # noqa: E402
import make_library as ml  # noqa: E402

# ---- tolerances -------------------------------------------------------------------------------------------------
# TIE TOLERANCE. A binary computes the scores s_i in float32. Since p_a / p_b = exp(s_a - s_b), an absolute error
# delta in the scores is a relative error delta in probability ratios, so two candidates can legitimately swap
# when |p_a - p_b| <= ~2 * delta * max(p_a, p_b). The float32 error of a score is a few ulps of the magnitude of
# the dot product behind it, M = sum_j |u_j v_j| / norm (PHATGOOSE: u = LN(x), v = LN(g_i), norm = sqrt(d_in), so
# M <= sqrt(d_in) ~ 71 at d_in = 5120; Arrow: u = x, v = e_i, norm = temperature (* sqrt(d_in) if scaled)), plus
# the LayerNorm's own rounding (a few ulps, relative) and, for Arrow, the binary's own singular-vector solve
# (~1e-6 relative in float32). Hence
#     near tie  <=>  |p_a - p_b| <= (TIE_REL + TIE_ULPS * eps_f32 * M) * max(p_a, p_b) + TIE_ABS
# TIE_REL = 1e-6 is ~8 ulps of float32 for O(1) scores. Measured float32 score error, in ulps of M (eps_f32 * M),
# on this generator's data for d_in = 16..5120: <= 3.4 with blocked accumulation (numpy/BLAS sgemm), <= 12.5 with
# strictly sequential accumulation over 5120 terms and a one-pass variance; a pair of scores can err in opposite
# directions, so TIE_ULPS = 32 (> 2 * 12.5) covers even the naive kernel. TIE_ABS = 1e-9: probabilities that small
# are exp(-20) below the winner — their order is float32 noise (a float32 softmax may flush them to 0) and their
# weights are < 1e-9, invisible to the other checks. Mismatches are accepted only token by token and only between
# candidates this close, so the tolerance cannot hide a systematic bug: a wrong implementation still fails on the
# many tokens with clear margins.
EPS_F32 = float(np.finfo(np.float32).eps)
TIE_REL = 1e-6
TIE_ULPS = 32.0
TIE_ABS = 1e-9
# WEIGHTS: |w_bin - w_ref| <= WEIGHT_ABS + 2 w (1 - w) * WEIGHT_ULPS * eps_f32 * M. The first term is the brief's
# 1e-5. The second is what a score error of delta does to w_i = p_i / sum_S p (|dw_i| <= 2 w_i (1 - w_i) delta);
# with WEIGHT_ULPS = 8 (2x the measured blocked-accumulation error) it is < 1e-6 at d_in <= 64 and reaches 2.4e-5
# only at d_in = 5120 with strongly aligned tokens (|s| ~ 30), where 1e-5 alone would reject a correct float32
# kernel (measured weight error of a sequential float32 dot product there: ~3e-5).
WEIGHT_ABS = 1e-5
WEIGHT_ULPS = 8.0
# DELTA: the reference delta is sum over the binary's (accepted) experts of w_bin * scale * B (A x) in float64,
# i.e. it uses the binary's own weights (already checked above), so this check isolates the expert arithmetic:
# a float32 B (A x) carries relative error ~ eps_f32 * sqrt(d_in) (< 1e-5 even at d_in = 5120 with sequential
# accumulation); 1e-4 per row is the brief's bound. The row floor 1e-6 * rms keeps rows that are (near) zero —
# e.g. x = 0 — from dividing by ~0.
DELTA_REL = 1e-4
DELTA_FLOOR = 1e-6


# ---- comparison -------------------------------------------------------------------------------------------------

@dataclass
class ModuleReport:
    module: str
    errors: list = field(default_factory=list)
    worst_delta: float = 0.0
    worst_weight: float = 0.0
    near_ties: int = 0
    tokens: int = 0


def score_magnitude(lib, module, Xr, options):
    """[U] the scale M of the dot products behind the scores (see TIE TOLERANCE)."""
    d_in = Xr.shape[1]
    cand = lib.candidates(module)
    if options.router == "phatgoose":
        G = ref.layer_norm(np.array([lib.experts[i].modules[module].gate for i in cand]))
        return (np.abs(ref.layer_norm(Xr)) @ np.abs(G).T).max(axis=1) / math.sqrt(d_in)
    if options.router == "arrow":
        E = lib.arrow_prototypes(module)
        m = (np.abs(Xr) @ np.abs(E).T).max(axis=1) / options.arrow_temperature
        return m / math.sqrt(d_in) if options.arrow_scaled else m
    return np.zeros(Xr.shape[0])


def tie_slack(pa, pb, tau):
    return tau * np.maximum(pa, pb) + TIE_ABS


def compare_module(lib, module, X, options, out, dtypes, any_order=False) -> ModuleReport:
    rep = ModuleReport(module=module, tokens=X.shape[0])
    err = rep.errors
    route = ref.route_module(lib, module, X, options)
    cand = route.candidates
    n = len(cand)
    T = X.shape[0]
    d_out = lib.module_dims(module)[1]
    k_out = n if options.router == "uniform" else options.top_k
    k_eff = min(k_out, n)

    names = {"delta": module, "experts": module + ".experts", "weights": module + ".weights"}
    want = {"delta": ("F32", (T, d_out)), "experts": ("I32", (T, k_out)), "weights": ("F32", (T, k_out))}
    arrays = {}
    for role, key in names.items():
        if key not in out:
            err.append(f"missing output tensor '{key}'")
            continue
        dt, shape = want[role]
        if dtypes[key] != dt or tuple(out[key].shape) != shape:
            err.append(f"'{key}': expected {dt} {list(shape)}, found {dtypes[key]} {list(out[key].shape)}")
            continue
        arrays[role] = out[key]
    if err:
        return rep
    d_bin = arrays["delta"].astype(np.float64)
    e_bin = arrays["experts"].astype(np.int64)
    w_bin = arrays["weights"].astype(np.float64)
    for role, a in (("delta", d_bin), ("weights", w_bin)):
        bad = ~np.isfinite(a)
        if bad.any():
            t = int(np.nonzero(bad.any(axis=1))[0][0])
            err.append(f"'{names[role]}': non-finite value at token {t}")
            return rep
    if T == 0:
        return rep

    unit = route.unit
    P = route.probs[unit]                                      # [T, n] reference probabilities per token
    Xr = ref.router_inputs(X.astype(np.float64), unit)
    M = score_magnitude(lib, module, Xr, options)[unit]      # [T]
    tau = TIE_REL + TIE_ULPS * EPS_F32 * M

    # Padding slots.
    if k_eff < k_out:
        bad = (e_bin[:, k_eff:] != -1) | (w_bin[:, k_eff:] != 0)
        if bad.any():
            t = int(np.nonzero(bad.any(axis=1))[0][0])
            err.append(f"token {t}: slots {k_eff}..{k_out - 1} must be expert -1 weight 0 (only {n} candidates), "
                       f"found experts {e_bin[t].tolist()} weights {w_bin[t].tolist()}")
    # Map the binary's experts to candidate positions.
    lookup = np.full(max(len(lib.experts), 1) + 1, -1, dtype=np.int64)
    lookup[cand] = np.arange(n)
    chosen = e_bin[:, :k_eff]
    in_range = (chosen >= 0) & (chosen < len(lib.experts))
    bpos = np.where(in_range, lookup[np.clip(chosen, 0, len(lib.experts))], -1)
    srt = np.sort(bpos, axis=1)
    valid = (bpos >= 0).all(axis=1) & (np.diff(srt, axis=1) != 0).all(axis=1)
    for t in np.nonzero(~valid)[0][:3]:
        err.append(f"token {t}: experts {e_bin[t].tolist()} are not {k_eff} distinct candidates of "
                   f"{cand.tolist()}")
    rpos = route.positions[unit][:, :k_eff]
    same = valid & (srt == np.sort(rpos, axis=1)).all(axis=1)

    # Near-tie acceptance for differing sets.
    shown = 0
    for t in np.nonzero(valid & ~same)[0]:
        p = P[t]
        mask = np.zeros(n, dtype=bool)
        mask[bpos[t]] = True
        pb = p[mask].min()
        pc = p[~mask].max() if (~mask).any() else -np.inf
        if pc - pb <= tie_slack(pb, pc, tau[t]):
            rep.near_ties += 1
        else:
            valid[t] = False
            if shown < 3:
                shown += 1
                err.append(f"token {t}: binary chose experts {e_bin[t, :k_eff].tolist()}, reference "
                           f"{cand[rpos[t]].tolist()} (p of binary's weakest {pb:.9g} < best unchosen {pc:.9g}, "
                           f"beyond the tie tolerance)")
    if (~valid).sum() > 3:
        err.append(f"{int((~valid).sum())} of {T} tokens have a wrong expert choice")

    # Slot order: descending reference probability, ties either way.
    if not any_order and k_eff > 1:
        pv = np.take_along_axis(P, np.maximum(bpos, 0), axis=1)
        up = (pv[:, 1:] - pv[:, :-1]) > tie_slack(pv[:, 1:], pv[:, :-1], tau[:, None])
        bad = valid & up.any(axis=1)
        for t in np.nonzero(bad)[0][:3]:
            err.append(f"token {t}: slots not in descending probability: experts {e_bin[t, :k_eff].tolist()} "
                       f"with p {pv[t].tolist()}")

    # Per-sequence: every token of a sequence carries the same experts.
    if options.granularity == "sequence":
        first = np.searchsorted(unit, unit)          # index of the first token of each token's unit
        diff = (e_bin != e_bin[first]).any(axis=1)
        for t in np.nonzero(diff)[0][:3]:
            err.append(f"token {t}: experts {e_bin[t].tolist()} differ from those of its sequence's first token "
                       f"{int(first[t])}: {e_bin[first[t]].tolist()}")

    # Reference weights for the binary's choice (reference choice where the binary's is invalid).
    use_pos = np.where(valid[:, None], bpos, rpos)
    if options.router == "uniform":
        w_ref = np.full((T, k_eff), 1.0 / n)
    else:
        pch = np.take_along_axis(P, use_pos, axis=1)
        w_ref = pch / (pch.sum(axis=1, keepdims=True) + ref.TOPK_NORM_EPS)
    werr = np.abs(w_bin[:, :k_eff] - w_ref)
    werr[~valid] = 0.0
    wtol = WEIGHT_ABS + 2 * w_ref * (1 - w_ref) * WEIGHT_ULPS * EPS_F32 * M[:, None]
    rep.worst_weight = float(werr.max()) if werr.size else 0.0
    over = werr > wtol
    if over.any():
        t, j = (int(v) for v in np.argwhere(over)[0])
        err.append(f"token {t}: weights {w_bin[t, :k_eff].tolist()} vs reference {w_ref[t].tolist()} "
                   f"(slot {j}: |diff| {werr[t, j]:.3g} > tolerance {wtol[t, j]:.3g}); "
                   f"{int(over.any(axis=1).sum())} of {T} tokens over")

    # Mixture delta, with the binary's experts and weights (reference choice/weights where the choice is invalid).
    e_use = cand[use_pos].astype(np.int64)
    w_use = np.where(valid[:, None], w_bin[:, :k_eff], w_ref)
    d_ref = ref.mixture_delta(lib, module, X, e_use, w_use)
    norms = np.linalg.norm(d_ref, axis=1)
    floor = max(DELTA_FLOOR * float(np.sqrt(np.mean(norms ** 2))), 1e-30)
    rel = np.linalg.norm(d_bin - d_ref, axis=1) / np.maximum(norms, floor)
    rep.worst_delta = float(rel.max())
    if rep.worst_delta > DELTA_REL:
        t = int(np.argmax(rel))
        err.append(f"token {t}: delta relative error {rep.worst_delta:.3g} > {DELTA_REL:g} "
                   f"(|ref| {norms[t]:.4g}); {int((rel > DELTA_REL).sum())} of {T} rows over")
    return rep


@dataclass
class CaseReport:
    name: str
    modules: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.errors and all(not m.errors for m in self.modules)

    def all_errors(self):
        return self.errors + [f"{m.module}: {e}" for m in self.modules for e in m.errors]

    def summary(self):
        wd = max((m.worst_delta for m in self.modules), default=0.0)
        ww = max((m.worst_weight for m in self.modules), default=0.0)
        ties = sum(m.near_ties for m in self.modules)
        toks = sum(m.tokens for m in self.modules)
        return f"modules={len(self.modules)} tokens={toks} worst_delta_rel={wd:.2e} worst_weight_abs={ww:.2e} " \
               f"near_ties={ties}"


def compare_case(name, lib, inputs, options, out, dtypes, any_order=False) -> CaseReport:
    rep = CaseReport(name=name)
    expected = set()
    for module, X in inputs.items():
        expected |= {module, module + ".experts", module + ".weights"}
        rep.modules.append(compare_module(lib, module, X, options, out, dtypes, any_order=any_order))
    extra = sorted(set(out) - expected)
    if extra:
        rep.errors.append(f"unexpected output tensors {extra[:5]}")
    return rep


# ---- cases ------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    lib: dict            # generate_library kwargs (without out_dir)
    tokens: object       # int or {module: T}
    cli: dict            # apply options given on the command line (others come from the manifest / defaults)
    quick: bool = True
    input_kw: dict = field(default_factory=dict)
    extra_dirs: tuple = ()   # junk subdirectories/files that a directory scan must ignore


def _mods(**kw):
    return ml.t5_modules(**kw)


def build_cases():
    q0 = "encoder.block.0.layer.0.SelfAttention.q"
    k0 = "encoder.block.0.layer.0.SelfAttention.k"
    v0 = "encoder.block.0.layer.0.SelfAttention.v"
    o0 = "encoder.block.0.layer.0.SelfAttention.o"
    wi0 = "encoder.block.0.layer.1.DenseReluDense.wi"
    wo0 = "encoder.block.0.layer.1.DenseReluDense.wo"
    cases = []
    cases.append(Case("t1_n3_k2_w16", dict(n_experts=3, modules=_mods(d_model=16, d_ff=32), rank=4, seed=11),
                      tokens=1, cli=dict(router="phatgoose", top_k=2)))
    cases.append(Case("n2_k1_w48_alpha16", dict(n_experts=2, modules=_mods(d_model=48, d_ff=96), rank=8, alpha=16,
                                                seed=12),
                      tokens=40, cli=dict(router="phatgoose", top_k=1)))
    cases.append(Case("n8_k3_rslora_rank_alpha_pattern",
                      dict(n_experts=8, modules=_mods(blocks=(0, 1), d_model=64, d_ff=128), rank=8, alpha=16,
                           use_rslora=True,
                           # first matching key wins: block 0 q -> 2, block 1 q -> 32 (not 4), wo -> 4
                           rank_pattern={"block.0.layer.0.SelfAttention.q": 2, "q": 32,
                                         "block.1.layer.0.SelfAttention.q": 4, "wo": 4},
                           alpha_pattern={"k": 4, r"DenseReluDense\.w.": 64, "wi": 1}, seed=13),
                      tokens=200, cli=dict(router="phatgoose", top_k=3)))
    cases.append(Case("n16_k4_bf16_w128", dict(n_experts=16, modules=_mods(d_model=128, d_ff=256), rank=16,
                                               weight_dtype="BF16", gate_dtype="BF16", seed=14),
                      tokens=256, cli=dict(router="phatgoose", top_k=4)))
    skip = {i: [q0] for i in range(12) if i not in (3, 7)}          # q0: 2 candidates (< k = 3)
    for i in range(12):
        if i != 5:
            skip.setdefault(i, []).append(k0)                        # k0: 1 candidate
    skip[0] = skip[0] + [wi0, wo0]
    skip[9] = skip[9] + [v0]
    skip[10] = skip[10] + [o0, wo0]
    cases.append(Case("n12_k3_f16w_bf16g_skip_fewer_than_k",
                      dict(n_experts=12, modules=_mods(d_model=64, d_ff=192), rank=8, weight_dtype="F16",
                           gate_dtype="BF16", skip=skip, seed=15),
                      tokens=128, cli=dict(router="phatgoose", top_k=3)))
    cases.append(Case("dirscan_n6_byte_order_zero_rows",
                      dict(n_experts=6, modules=_mods(d_model=32, d_ff=64), rank=8, manifest=False,
                           names=["zeta", "Alpha", "beta", "alpha", "Beta2", "_x"],
                           weight_dtype=["F32", "F16", "BF16", "F32", "F32", "F16"], seed=16),
                      tokens=64, cli=dict(router="phatgoose", top_k=2), input_kw=dict(zero_rows=2),
                      extra_dirs=("notes", "zz_not_an_expert")))
    cases.append(Case("manifest_defaults_arrow_k3_shuffled",
                      dict(n_experts=9, modules=_mods(d_model=64, d_ff=128), rank=16, alpha=32,
                           names=["rte", "cb", "wsc", "copa", "anli_r1", "hswag", "wic", "story", "winogr"],
                           routing={"router": "arrow", "top_k": 3}, seed=17),
                      tokens=100, cli=dict()))
    cases.append(Case("mixed_T_zero_rows_n5",
                      dict(n_experts=5, modules=_mods(d_model=48, d_ff=64), rank=4, alpha=8, gate_dtype="F16",
                           seed=18),
                      tokens={q0: 1, k0: 3, v0: 17, o0: 333, wi0: 64, wo0: 2}, cli=dict(router="phatgoose",
                                                                                      top_k=2),
                      input_kw=dict(zero_rows=1)))
    cases.append(Case("rank1_k1_n5", dict(n_experts=5, modules=_mods(d_model=16, d_ff=48), rank=1, alpha=2,
                                          seed=19),
                      tokens=32, cli=dict(router="phatgoose", top_k=1)))
    cases.append(Case("arrow_default_temp_k2_n10", dict(n_experts=10, modules=_mods(d_model=64, d_ff=128), rank=16,
                                                        seed=20),
                      tokens=200, cli=dict(router="arrow", top_k=2)))
    cases.append(Case("arrow_scaled_temp2.5_k3_bf16_w256",
                      dict(n_experts=12, modules=_mods(d_model=256, d_ff=512, attention=("q", "o")), rank=16,
                           weight_dtype="BF16", seed=21),
                      tokens=128, cli=dict(router="arrow", top_k=3, arrow_temperature=2.5, arrow_scaled=True)))
    cases.append(Case("arrow_unscaled_temp4_w1024_n6",
                      dict(n_experts=6, modules=_mods(d_model=1024, d_ff=1024, attention=("q",), ffn=("wo",)),
                           rank=16, seed=22),
                      tokens=32, cli=dict(router="arrow", top_k=2, arrow_temperature=4.0)))
    cases.append(Case("uniform_skip_n7", dict(n_experts=7, modules=_mods(d_model=32, d_ff=64), rank=8,
                                              skip={0: [q0], 1: [q0, k0], 2: [q0, k0, v0], 3: [wo0]}, seed=23),
                      tokens=50, cli=dict(router="uniform", top_k=2)))
    cases.append(Case("sequence_phatgoose_L16_k2",
                      dict(n_experts=8, modules=_mods(d_model=64, d_ff=128), rank=8, seed=24),
                      tokens={q0: 100, k0: 1, v0: 15, o0: 16, wi0: 33, wo0: 64},
                      cli=dict(router="phatgoose", top_k=2, granularity="sequence", sequence_length=16),
                      input_kw=dict(run_length=16)))
    cases.append(Case("sequence_arrow_L7_k3",
                      dict(n_experts=10, modules=_mods(d_model=64, d_ff=128), rank=8, seed=25),
                      tokens=50, cli=dict(router="arrow", top_k=3, granularity="sequence", sequence_length=7),
                      input_kw=dict(run_length=5)))
    cases.append(Case("sequence_uniform_L4_skip",
                      dict(n_experts=4, modules=_mods(d_model=16, d_ff=32), rank=4, skip={1: [q0], 2: [wo0]},
                           seed=26),
                      tokens=10, cli=dict(router="uniform", granularity="sequence", sequence_length=4)))
    # --- heavier cases (skipped by --quick) ---
    cases.append(Case("long_T4096_n10_w32", dict(n_experts=10, modules=[(q0, 32, 32), (wi0, 32, 64)], rank=8,
                                                 seed=27),
                      tokens={q0: 4096, wi0: 2048}, cli=dict(router="phatgoose", top_k=2), quick=False))
    cases.append(Case("n200_k2_w128_skip",
                      dict(n_experts=200, modules=_mods(d_model=128, d_ff=256, attention=("q", "o")), rank=16,
                           skip=0.1, gate_dtype="BF16", seed=28),
                      tokens=256, cli=dict(router="phatgoose", top_k=2), quick=False))
    cases.append(Case("n64_r64_k4_w256_f16",
                      dict(n_experts=64, modules=_mods(d_model=256, d_ff=512, attention=("q", "v"), ffn=()),
                           rank=64, alpha=128, weight_dtype="F16", gate_dtype="F16", seed=29),
                      tokens=128, cli=dict(router="phatgoose", top_k=4), quick=False))
    cases.append(Case("wide_5120_n4_k2",
                      dict(n_experts=4, modules=[(q0, 2048, 2048), (wi0, 2048, 5120), (wo0, 5120, 2048)],
                           rank=16, seed=30, weight_dtype=["F32", "BF16", "F32", "F16"]),
                      tokens={q0: 1, wi0: 64, wo0: 128}, cli=dict(router="phatgoose", top_k=2), quick=False))
    cases.append(Case("w1_like_n36_w2048_r16_k2",
                      dict(n_experts=36, modules=[(q0, 2048, 2048)], rank=16, alpha=1.0, seed=33),
                      tokens=256, cli=dict(router="phatgoose", top_k=2), quick=False))
    cases.append(Case("arrow_scaled_5120_n4_k1",
                      dict(n_experts=4, modules=[(wo0, 5120, 2048)], rank=16, seed=31),
                      tokens=24, cli=dict(router="arrow", top_k=1, arrow_scaled=True), quick=False))
    cases.append(Case("n40_k2_decoder_w256_f16g",
                      dict(n_experts=40, modules=_mods(d_model=256, d_ff=512, decoder=True), rank=16,
                           gate_dtype="F16", skip=0.15, seed=32),
                      tokens=96, cli=dict(router="phatgoose", top_k=2), quick=False))
    return cases


def cli_args(cli: dict) -> list:
    args = []
    if "router" in cli:
        args += ["--router", cli["router"]]
    if "top_k" in cli:
        args += ["--top-k", str(cli["top_k"])]
    if "granularity" in cli:
        args += ["--granularity", cli["granularity"]]
    if "sequence_length" in cli:
        args += ["--sequence-length", str(cli["sequence_length"])]
    if "arrow_temperature" in cli:
        args += ["--arrow-temperature", repr(float(cli["arrow_temperature"]))]
    if cli.get("arrow_scaled"):
        args.append("--arrow-scaled")
    return args


def prepare_case(case: Case, root: str):
    libdir = os.path.join(root, "library")
    info = ml.generate_library(libdir, **case.lib)
    for junk in case.extra_dirs:                 # a directory scan must skip these
        os.makedirs(os.path.join(libdir, junk), exist_ok=True)
        with open(os.path.join(libdir, junk, "README.txt"), "w") as fh:
            fh.write("not an expert\n")
    inputs = ml.make_inputs(info, case.tokens, seed=case.lib.get("seed", 0), **case.input_kw)
    xpath = os.path.join(root, "input.safetensors")
    ref.write_safetensors(xpath, inputs)
    return libdir, inputs, xpath


def run_case(binary: list, case: Case, root: str, any_order=False, timeout=900) -> tuple:
    os.makedirs(root, exist_ok=True)
    libdir, inputs, xpath = prepare_case(case, root)
    ypath = os.path.join(root, "output.safetensors")
    cmd = binary + ["apply", "--library", libdir, "--input", xpath, "--output", ypath] + cli_args(case.cli)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        rep = CaseReport(case.name)
        rep.errors.append(f"binary timed out after {timeout}s")
        return rep, time.time() - t0
    t_bin = time.time() - t0
    rep = CaseReport(case.name)
    if proc.returncode != 0:
        rep.errors.append(f"binary exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return rep, t_bin
    if not os.path.exists(ypath):
        rep.errors.append("binary exited 0 but wrote no output file")
        return rep, t_bin
    try:
        out, dtypes, _ = ref.read_safetensors(ypath, decode=True)
    except ref.RefError as exc:
        rep.errors.append(f"output is not a readable safetensors file: {exc}")
        return rep, t_bin
    lib = ref.load_library(libdir)
    c = case.cli
    options = ref.resolve_options(lib, router=c.get("router"), top_k=c.get("top_k"), granularity=c.get("granularity"),
                                  sequence_length=c.get("sequence_length"),
                                  arrow_temperature=c.get("arrow_temperature"),
                                  arrow_scaled=c.get("arrow_scaled", False))
    return compare_case(case.name, lib, inputs, options, out, dtypes, any_order=any_order), t_bin


# ---- self-test --------------------------------------------------------------------------------------------------

def _naive_apply(lib, inputs, options):
    """Token-by-token loops straight from the formulas: cross-checks the vectorised reference."""
    out, proto = {}, {}
    for module, X in inputs.items():
        X = X.astype(np.float64)
        cand = [e.index for e in lib.experts if module in e.modules]
        n, T, d = len(cand), X.shape[0], X.shape[1]
        L = options.sequence_length if options.granularity == "sequence" else 1
        k_out = n if options.router == "uniform" else options.top_k
        _, d_out = lib.module_dims(module)
        delta = np.zeros((T, d_out))
        ex = np.full((T, k_out), -1, dtype=np.int32)
        wt = np.zeros((T, k_out))
        for start in range(0, T, L):
            rows = list(range(start, min(start + L, T)))
            x = X[rows].mean(axis=0)
            if options.router == "uniform":
                picks = [(i, 1.0 / n) for i in cand]
            else:
                s = []
                for i in cand:
                    m = lib.experts[i].modules[module]
                    if options.router == "phatgoose":
                        lx = (x - x.mean()) / math.sqrt(x.var() + 1e-5)
                        g = m.gate
                        lg = (g - g.mean()) / math.sqrt(g.var() + 1e-5)
                        s.append(float(lx @ lg) / math.sqrt(d))
                    else:
                        if id(m) not in proto:          # full SVD of the product (the reference uses QR + SVD)
                            proto[id(m)] = np.linalg.svd(m.B @ m.A)[2][0]
                        v = abs(float(x @ proto[id(m)])) / options.arrow_temperature
                        s.append(v / math.sqrt(d) if options.arrow_scaled else v)
                mx = max(s)
                e = [math.exp(v - mx) for v in s]
                p = [v / sum(e) for v in e]
                order = sorted(range(n), key=lambda j: (-p[j], j))[:min(options.top_k, n)]
                tot = sum(p[j] for j in order) + 1e-6
                picks = [(cand[j], p[j] / tot) for j in order]
            for t in rows:
                for slot, (i, w) in enumerate(picks):
                    m = lib.experts[i].modules[module]
                    ex[t, slot] = i
                    wt[t, slot] = w
                    delta[t] += w * m.scale * (m.B @ (m.A @ X[t]))
        out[module], out[module + ".experts"], out[module + ".weights"] = delta, ex, wt
    return out


def self_test(keep=False) -> int:
    """Proves the comparator accepts the reference and catches small errors."""
    root = tempfile.mkdtemp(prefix="phatgoose-selftest-")
    results = []

    def check(name, expect_ok, rep):
        ok = rep.ok == expect_ok
        results.append(ok)
        detail = "" if rep.ok else " | " + "; ".join(rep.all_errors()[:2])
        print(f"{'PASS' if ok else 'FAIL'} self-test {name}: expected {'accept' if expect_ok else 'reject'}, "
              f"comparator {'accepted' if rep.ok else 'rejected'}{detail[:300]}", flush=True)

    def dtypes_of(out):
        return {k: ("I32" if v.dtype.kind == "i" else "F32") for k, v in out.items()}

    try:
        cases = {c.name: c for c in build_cases()}
        base = cases["n8_k3_rslora_rank_alpha_pattern"]
        libdir, inputs, _ = prepare_case(base, os.path.join(root, "base"))
        lib = ref.load_library(libdir)
        opts = ref.resolve_options(lib, router="phatgoose", top_k=3)
        good = ref.apply(lib, inputs, opts)
        m = next(iter(inputs))

        def variant(mutate):
            out = {k: v.copy() for k, v in good.items()}
            mutate(out)
            return compare_case("v", lib, inputs, opts, out, dtypes_of(out))

        check("reference vs itself", True, variant(lambda o: None))

        # Vectorised reference == naive loops, for every router/granularity on small cases.
        for cname in ("n8_k3_rslora_rank_alpha_pattern", "n12_k3_f16w_bf16g_skip_fewer_than_k",
                      "arrow_scaled_temp2.5_k3_bf16_w256", "sequence_arrow_L7_k3", "sequence_uniform_L4_skip",
                      "dirscan_n6_byte_order_zero_rows"):
            c = cases[cname]
            d, ins, _ = prepare_case(c, os.path.join(root, "naive-" + cname))
            l2 = ref.load_library(d)
            o2 = ref.resolve_options(l2, **{k: v for k, v in c.cli.items()})
            naive = _naive_apply(l2, ins, o2)
            rep = compare_case("naive", l2, ins, o2, naive, dtypes_of(naive))
            fast = ref.apply(l2, ins, o2)
            same_choice = all(np.array_equal(fast[k], naive[k]) for k in fast if k.endswith(".experts"))
            if not same_choice:
                rep.errors.append("naive and vectorised reference chose different experts")
            check(f"naive loop reference == vectorised reference ({cname})", True, rep)

        row = 5
        check("delta row off by 1e-6 relative", True,
              variant(lambda o: o.__setitem__(m, o[m] + np.where(np.arange(len(o[m]))[:, None] == row,
                                                                  1e-6 * o[m], 0).astype(np.float32))))

        def bump_delta(o, rel):
            d = o[m].astype(np.float64)
            noise = np.random.default_rng(1).standard_normal(d.shape[1])
            d[row] += rel * np.linalg.norm(d[row]) * noise / np.linalg.norm(noise)
            o[m] = d.astype(np.float32)
        check("one delta row off by 3e-4 relative", False, variant(lambda o: bump_delta(o, 3e-4)))
        check("one weight off by 2e-5", False,
              variant(lambda o: o[m + ".weights"].__setitem__((row, 1), o[m + ".weights"][row, 1] + 2e-5)))
        check("one weight off by 3e-6", True,
              variant(lambda o: o[m + ".weights"].__setitem__((row, 1), o[m + ".weights"][row, 1] + 3e-6)))

        route = ref.route_module(lib, m, inputs[m], opts)
        cand = route.candidates
        p = route.probs[row]
        third = int(route.positions[row, 2])
        fourth_pos = int(np.argsort(-p, kind="stable")[3])

        def swap_expert(o):
            o[m + ".experts"][row, 2] = cand[fourth_pos]
        check(f"3rd choice swapped for the 4th (p {p[third]:.4g} vs {p[fourth_pos]:.4g})", False, variant(swap_expert))

        def swap_order(o):
            o[m + ".experts"][row, [0, 1]] = o[m + ".experts"][row, [1, 0]]
            o[m + ".weights"][row, [0, 1]] = o[m + ".weights"][row, [1, 0]]
        check("slots 0 and 1 swapped (set, weights and delta unchanged)", False, variant(swap_order))
        out = {k: v.copy() for k, v in good.items()}
        swap_order(out)
        check("... accepted with --any-order", True,
              compare_case("v", lib, inputs, opts, out, dtypes_of(out), any_order=True))
        check("non-candidate expert index", False,
              variant(lambda o: o[m + ".experts"].__setitem__((row, 0), len(lib.experts) + 3)))
        check("duplicate expert in a row", False,
              variant(lambda o: o[m + ".experts"].__setitem__((row, 1), o[m + ".experts"][row, 0])))
        check("NaN in delta", False, variant(lambda o: o[m].__setitem__((row, 0), np.nan)))
        check("missing weights tensor", False, variant(lambda o: o.pop(m + ".weights")))
        check("extra output tensor", False, variant(lambda o: o.__setitem__("junk", np.zeros(1, np.float32))))
        out = {k: v.copy() for k, v in good.items()}
        dts = dtypes_of(out)
        dts[m + ".experts"] = "I64"
        check("experts stored as I64", False, compare_case("v", lib, inputs, opts, out, dts))
        check("whole delta scaled by 1.001 (e.g. a wrong LoRA scale)", False,
              variant(lambda o: o.__setitem__(m, (o[m] * 1.001).astype(np.float32))))
        check("delta rows in reverse order", False,
              variant(lambda o: o.__setitem__(m, o[m][::-1].copy())))

        # Honest float32 arithmetic must be accepted: the reference's float32 emulations (BLAS-style, and naive
        # sequential dot products with a one-pass variance), including the widest case.
        for cname, naive in (("n16_k4_bf16_w128", False), ("arrow_scaled_temp2.5_k3_bf16_w256", True),
                             ("sequence_phatgoose_L16_k2", True), ("wide_5120_n4_k2", True)):
            c = cases[cname]
            d, ins, _ = prepare_case(c, os.path.join(root, "f32-" + cname))
            l2 = ref.load_library(d)
            o64 = ref.resolve_options(l2, **c.cli)
            o32 = ref.resolve_options(l2, dtype=np.float32, naive=naive, **c.cli)
            out = ref.apply(l2, ins, o32)
            rep = compare_case("f32", l2, ins, o64, out, dtypes_of(out))
            check(f"float32{' naive' if naive else ''} emulation of {cname} ({rep.summary()})", True, rep)

        # Padding: module with 2 candidates at k = 3.
        sc = cases["n12_k3_f16w_bf16g_skip_fewer_than_k"]
        d, ins, _ = prepare_case(sc, os.path.join(root, "skip"))
        l2 = ref.load_library(d)
        o2 = ref.resolve_options(l2, router="phatgoose", top_k=3)
        g2 = ref.apply(l2, ins, o2)
        q0 = "encoder.block.0.layer.0.SelfAttention.q"
        o = {k: v.copy() for k, v in g2.items()}
        o[q0 + ".experts"][0, 2] = 0
        check("padding slot holds expert 0 instead of -1", False, compare_case("v", l2, ins, o2, o, dtypes_of(o)))

        # Near-tie acceptance: expert 1 gets expert 0's gate exactly, so p_0 == p_1 for every token.
        tdir = os.path.join(root, "tie")
        info = ml.generate_library(tdir, n_experts=4, modules=ml.t5_modules(d_model=32, d_ff=64), rank=4, seed=5)
        g0 = ref.load_tensors(os.path.join(tdir, info.names[0], "gates.safetensors"))
        ref.write_safetensors(os.path.join(tdir, info.names[1], "gates.safetensors"), g0)
        ins = ml.make_inputs(info, 40, seed=5)
        l3 = ref.load_library(tdir)
        o3 = ref.resolve_options(l3, router="phatgoose", top_k=1)
        g3 = ref.apply(l3, ins, o3)
        mm = next(iter(ins))
        rows = np.nonzero(g3[mm + ".experts"][:, 0] == 0)[0]
        tie_out = {k: v.copy() for k, v in g3.items()}
        tie_out[mm + ".experts"][rows, 0] = 1          # the tied twin, as a float32 binary might choose
        check(f"exact tie resolved to the other twin in {len(rows)} tokens, delta NOT recomputed", False,
              compare_case("v", l3, ins, o3, tie_out, dtypes_of(tie_out)))
        twin = ref.mixture_delta(l3, mm, ins[mm], tie_out[mm + ".experts"], tie_out[mm + ".weights"])
        tie_out[mm] = twin.astype(np.float32)
        rep = compare_case("v", l3, ins, o3, tie_out, dtypes_of(tie_out))
        ties = sum(r.near_ties for r in rep.modules)
        if ties != len(rows):
            rep.errors.append(f"expected {len(rows)} accepted near-ties, counted {ties}")
        check(f"exact tie resolved to the other twin, delta for the twin ({ties} near-ties accepted)", True, rep)
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if all(results) else 1


# ---- golden fixtures --------------------------------------------------------------------------------------------

GOLDEN_DIR = os.path.normpath(os.path.join(HERE, "..", "Fixtures", "golden"))


def run_golden(binary: list, golden_dir: str, any_order=False) -> tuple:
    """Runs the binary on every Tests/Fixtures/golden/<case>. Besides the usual rules (against the reference
    recomputed from the fixture's library), the output must match expected.safetensors strictly: identical experts
    in identical slots (the fixtures have no near-ties), weights within 1e-5, delta rows within 1e-4."""
    import json
    passed = failed = 0
    root = tempfile.mkdtemp(prefix="phatgoose-golden-")
    try:
        for case in sorted(os.listdir(golden_dir)):
            cdir = os.path.join(golden_dir, case)
            if not os.path.isfile(os.path.join(cdir, "case.json")):
                continue
            with open(os.path.join(cdir, "case.json")) as fh:
                doc = json.load(fh)
            ypath = os.path.join(root, case + ".safetensors")
            cmd = binary + ["apply", "--library", os.path.join(cdir, "library"), "--input",
                            os.path.join(cdir, "input.safetensors"), "--output", ypath] + doc["args"]
            rep = CaseReport(case)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0 or not os.path.exists(ypath):
                rep.errors.append(f"binary exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
            else:
                out, dtypes, _ = ref.read_safetensors(ypath)
                lib = ref.load_library(os.path.join(cdir, "library"))
                inputs = ref.load_tensors(os.path.join(cdir, "input.safetensors"))
                options = ref.resolve_options(lib, router=doc["router"], top_k=doc["top_k"],
                                              granularity=doc["granularity"], sequence_length=doc["sequence_length"],
                                              arrow_temperature=doc["arrow_temperature"],
                                              arrow_scaled=doc["arrow_scaled"])
                rep = compare_case(case, lib, inputs, options, out, dtypes, any_order=any_order)
                expected = ref.load_tensors(os.path.join(cdir, "expected.safetensors"))
                for key, want in expected.items():
                    got = out.get(key)
                    if got is None or got.shape != want.shape:
                        continue                      # already reported by compare_case
                    if key.endswith(".experts"):
                        if not np.array_equal(got, want):
                            t = int(np.nonzero((got != want).any(axis=1))[0][0])
                            rep.errors.append(f"{key}: token {t}: experts {got[t].tolist()}, expected "
                                              f"{want[t].tolist()} (golden fixtures require identical slots)")
                    elif key.endswith(".weights"):
                        diff = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
                        if diff > WEIGHT_ABS:
                            rep.errors.append(f"{key}: max |weight - expected| {diff:.3g} > {WEIGHT_ABS:g}")
                    else:
                        w = want.astype(np.float64)
                        norms = np.linalg.norm(w, axis=1)
                        floor = max(DELTA_FLOOR * float(np.sqrt(np.mean(norms ** 2))) if norms.size else 0, 1e-30)
                        rel = np.linalg.norm(got - w, axis=1) / np.maximum(norms, floor)
                        if rel.size and rel.max() > DELTA_REL:
                            rep.errors.append(f"{key}: delta row {int(np.argmax(rel))} off expected by "
                                              f"{rel.max():.3g} relative > {DELTA_REL:g}")
            status = "PASS" if rep.ok else "FAIL"
            passed += rep.ok
            failed += not rep.ok
            print(f"{status} golden/{case}  {rep.summary()}", flush=True)
            for e in rep.all_errors()[:8]:
                print(f"    {e}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return passed, failed


# ---- main -------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?", help="command string for the phatgoose executable (split with shlex)")
    ap.add_argument("--quick", action="store_true", help="only the light cases")
    ap.add_argument("--cases", help="comma-separated substrings selecting cases")
    ap.add_argument("--any-order", action="store_true", help="do not require descending-probability slot order")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--self-test", action="store_true", help="check that the comparator catches errors")
    ap.add_argument("--golden", action="store_true",
                    help="run the binary on Tests/Fixtures/golden/* instead of the random cases")
    ap.add_argument("--golden-dir", default=GOLDEN_DIR)
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(keep=args.keep)
    cases = build_cases()
    if args.quick:
        cases = [c for c in cases if c.quick]
    if args.cases:
        keys = args.cases.split(",")
        cases = [c for c in cases if any(k in c.name for k in keys)]
    if args.list:
        for c in cases:
            print(c.name, "(quick)" if c.quick else "", " ".join(cli_args(c.cli)))
        return 0
    if not args.binary:
        ap.error("PHATGOOSE_BINARY is required (or --self-test)")
    binary = shlex.split(args.binary)
    if args.golden:
        passed, failed = run_golden(binary, args.golden_dir, any_order=args.any_order)
        print(f"{passed} passed, {failed} failed")
        return 0 if failed == 0 and passed > 0 else 1
    root = tempfile.mkdtemp(prefix="phatgoose-conformance-")
    passed = failed = 0
    t_start = time.time()
    try:
        for case in cases:
            t0 = time.time()
            try:
                rep, t_bin = run_case(binary, case, os.path.join(root, case.name), any_order=args.any_order)
            except Exception as exc:  # a harness crash on one case must not hide the others
                rep, t_bin = CaseReport(case.name, errors=[f"harness error: {type(exc).__name__}: {exc}"]), 0.0
            status = "PASS" if rep.ok else "FAIL"
            passed += rep.ok
            failed += not rep.ok
            print(f"{status} {case.name}  {rep.summary()}  binary={t_bin:.1f}s total={time.time() - t0:.1f}s",
                  flush=True)
            for e in rep.all_errors()[:8]:
                print(f"    {e}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"# total {time.time() - t_start:.1f}s", file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Independent numpy reference for PHATGOOSE mixture-of-LoRA-experts routing.

This is the executable form of /work/shared/DESIGN.md §1-§3, written from the math alone. It is a *reference*,
not a validator: it reads a library with the simple rules below, computes everything in float64, and writes the
same output format as `phatgoose apply`.

Library module (import it):
    read_safetensors(path) -> (tensors, dtypes, metadata)     F32/F16/BF16/F64/I8-I64/U8/BOOL; floats as float32,
                                                              BF16 decoded exactly (u16 << 16 as float32 bits)
    write_safetensors(path, tensors, metadata=None)           tensors: {name: array} or {name: (array, "BF16")}
    load_library(path) -> Library                             manifest order, or byte-sorted directory scan
    ApplyOptions(...), resolve_options(library, ...)          router / top_k / granularity / arrow options
    route_module(library, module, X, options) -> Route        probabilities, chosen experts, weights
    mixture_delta(library, module, X, experts, weights)       sum_i w_i * scale_i * B_i (A_i x)
    apply(library, inputs, options) -> {name: array}          the full `apply` output

CLI:
    phatgoose_ref.py apply --library LIB --input X.safetensors --output Y.safetensors [--top-k K]
        [--router phatgoose|arrow|uniform] [--granularity token|sequence] [--sequence-length L]
        [--arrow-temperature F] [--arrow-scaled] [--float32 | --float32-naive]
    (--float32 / --float32-naive are reference-only options: they run the same math in float32 — BLAS-style, or
    with strictly sequential dot products and a one-pass variance in the router — to emulate a float32 binary; the
    conformance harness uses them to check that its tolerances absorb honest float32 rounding. The float32 arrow
    prototypes are solved in float32 too.)
    Exit codes: 0 success, 1 bad input or data, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

LN_EPS = 1e-5          # LayerNorm epsilon (no affine)
TOPK_NORM_EPS = 1e-6   # w_i = p_i / (sum of chosen p + 1e-6)
ADAPTER_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


class RefError(Exception):
    """Bad input or data (CLI exit code 1)."""


# ---------------------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------------------

_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),   # raw bits; decoded below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact BF16 -> float32: the 16 bits become the high half of the float32 bit pattern."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float -> BF16 bits, rounding the float32 value to nearest, ties to even (NaN stays NaN)."""
    f = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    u = f.view(np.uint32).astype(np.uint64)
    rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint64(16)) | np.uint64(0x0040)).astype(np.uint16)
    return out


def read_safetensors(path: str, decode: bool = True):
    """Returns (tensors, dtypes, metadata). With decode, F16/BF16 come back as exact float32 arrays."""
    with open(path, "rb") as fh:
        blob = fh.read()
    if len(blob) < 8:
        raise RefError(f"{path}: file too short for a safetensors header")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise RefError(f"{path}: header length {n} exceeds file size {len(blob)}")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RefError(f"{path}: header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise RefError(f"{path}: header is not a JSON object")
    data = memoryview(blob)[8 + n:]
    metadata = header.pop("__metadata__", None) or {}
    tensors, dtypes = {}, {}
    for name, info in header.items():
        try:
            dtype_name = info["dtype"]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RefError(f"{path}: tensor '{name}': malformed header entry {info!r}") from None
        if dtype_name not in _NUMPY_DTYPES:
            raise RefError(f"{path}: tensor '{name}': unsupported dtype {dtype_name}")
        np_dtype = _NUMPY_DTYPES[dtype_name]
        count = math.prod(shape)
        if not (0 <= begin <= end <= len(data)) or end - begin != count * np_dtype.itemsize:
            raise RefError(f"{path}: tensor '{name}': data_offsets [{begin}, {end}] do not fit shape {shape} "
                           f"of {dtype_name} in a {len(data)}-byte buffer")
        arr = np.frombuffer(data[begin:end], dtype=np_dtype, count=count).reshape(shape)
        if decode and dtype_name == "BF16":
            arr = bf16_bits_to_f32(arr)
        elif decode and dtype_name == "F16":
            arr = arr.astype(np.float32)   # exact
        else:
            arr = arr.copy()
        tensors[name] = arr
        dtypes[name] = dtype_name
    return tensors, dtypes, metadata


def load_tensors(path: str) -> dict:
    return read_safetensors(path)[0]


def _encode(array, dtype_name: str | None):
    arr = np.asarray(array)
    if dtype_name is None:
        if arr.dtype == np.float64 or arr.dtype == np.float32:
            dtype_name = "F32"
        elif arr.dtype == np.float16:
            dtype_name = "F16"
        else:
            for key, dt in _NUMPY_DTYPES.items():
                if key != "BF16" and arr.dtype == dt:
                    dtype_name = key
                    break
            else:
                if arr.dtype.kind == "i":
                    dtype_name = "I64"
                else:
                    raise ValueError(f"cannot infer a safetensors dtype for {arr.dtype}")
    if dtype_name == "BF16":
        raw = f32_to_bf16_bits(arr)
    else:
        raw = arr.astype(_NUMPY_DTYPES[dtype_name])
    return dtype_name, list(arr.shape), np.ascontiguousarray(raw).tobytes()


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """tensors: {name: array} (float64/float32 -> F32) or {name: (array, dtype_name)}. Written in dict order."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name, value in tensors.items():
        array, dtype_name = value if isinstance(value, tuple) else (value, None)
        dtype_name, shape, raw = _encode(array, dtype_name)
        header[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((-len(hbytes)) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hbytes)))
        fh.write(hbytes)
        for raw in chunks:
            fh.write(raw)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Library
# ---------------------------------------------------------------------------------------------------------------

def pattern_value(patterns: dict | None, module: str, default):
    """PEFT rule: the first key (dict order) with re.match(rf"(.*\\.)?({key})$", module) wins, else default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class ExpertModule:
    A: np.ndarray        # [r, d_in] float64
    B: np.ndarray        # [d_out, r] float64
    gate: np.ndarray | None   # [d_in] float64 (None if the gate file lacks this module)
    rank: int
    alpha: float
    scale: float


@dataclass
class Expert:
    index: int
    name: str
    path: str
    config: dict
    modules: dict = field(default_factory=dict)   # module name -> ExpertModule


@dataclass
class Library:
    path: str
    experts: list
    routing: dict            # manifest "routing" (may be empty)
    has_manifest: bool
    _prototypes: dict = field(default_factory=dict)

    def candidates(self, module: str) -> list:
        """Expert indices adapting `module`, in expert-index order."""
        return [e.index for e in self.experts if module in e.modules]

    def module_dims(self, module: str):
        for e in self.experts:
            if module in e.modules:
                m = e.modules[module]
                return m.A.shape[1], m.B.shape[0]
        raise RefError(f"module '{module}': no expert in the library adapts it")

    def arrow_prototypes(self, module: str, dtype=np.float64) -> np.ndarray:
        """[n, d_in]: unit top right-singular vector of B_i @ A_i for each candidate (sign fixed: largest |entry| > 0).
        dtype float32 solves in float32 (emulation of a float32 binary only)."""
        key = (module, np.dtype(dtype).name)
        if key not in self._prototypes:
            rows = []
            for idx in self.candidates(module):
                m = self.experts[idx].modules[module]
                rows.append(arrow_prototype(m.A.astype(dtype), m.B.astype(dtype)))
            self._prototypes[key] = np.array(rows)
        return self._prototypes[key]


def arrow_prototype(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Top right-singular vector of B @ A without forming it: B = Q R  =>  B A = Q (R A), same right vectors."""
    _, R = np.linalg.qr(B, mode="reduced")
    _, _, vt = np.linalg.svd(R @ A, full_matrices=False)
    v = vt[0]
    if v[np.argmax(np.abs(v))] < 0:
        v = -v
    return v


def _read_json(path: str):
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise RefError(f"{path}: cannot read JSON: {exc}") from None


def load_library(path: str) -> Library:
    manifest_path = os.path.join(path, "library.json")
    routing = {}
    if os.path.exists(manifest_path):
        manifest = _read_json(manifest_path)
        entries = [(e["name"], e.get("path", e["name"])) for e in manifest["experts"]]
        routing = dict(manifest.get("routing") or {})
        has_manifest = True
    else:
        names = sorted((n for n in os.listdir(path)
                        if os.path.isfile(os.path.join(path, n, "adapter_config.json"))),
                       key=lambda n: n.encode("utf-8"))
        entries = [(n, n) for n in names]
        has_manifest = False
    experts = []
    for index, (name, rel) in enumerate(entries):
        edir = os.path.join(path, rel)
        config = _read_json(os.path.join(edir, "adapter_config.json"))
        weights = load_tensors(os.path.join(edir, "adapter_model.safetensors"))
        gates_path = os.path.join(edir, "gates.safetensors")
        gates = load_tensors(gates_path) if os.path.exists(gates_path) else {}
        expert = Expert(index=index, name=name, path=rel, config=config)
        r_global = int(config["r"])
        alpha_global = float(config.get("lora_alpha", 8))
        rslora = bool(config.get("use_rslora", False))
        for key in weights:
            if not (key.startswith(ADAPTER_PREFIX) and key.endswith(LORA_A_SUFFIX)):
                continue
            module = key[len(ADAPTER_PREFIX):-len(LORA_A_SUFFIX)]
            bkey = ADAPTER_PREFIX + module + LORA_B_SUFFIX
            if bkey not in weights:
                raise RefError(f"{edir}: '{key}' has no matching '{bkey}'")
            A = weights[key].astype(np.float64)
            B = weights[bkey].astype(np.float64)
            rank = int(pattern_value(config.get("rank_pattern"), module, r_global))
            alpha = float(pattern_value(config.get("alpha_pattern"), module, alpha_global))
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != rank or B.shape[1] != rank:
                raise RefError(f"{edir}: module '{module}': expected rank {rank}, found lora_A {list(A.shape)} "
                               f"lora_B {list(B.shape)}")
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            gate = gates[module].astype(np.float64).reshape(-1) if module in gates else None
            expert.modules[module] = ExpertModule(A=A, B=B, gate=gate, rank=rank, alpha=alpha, scale=scale)
        experts.append(expert)
    return Library(path=path, experts=experts, routing=routing, has_manifest=has_manifest)


# ---------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------

ROUTERS = ("phatgoose", "arrow", "uniform")


@dataclass
class ApplyOptions:
    router: str = "phatgoose"
    top_k: int = 2
    granularity: str = "token"
    sequence_length: int | None = None
    arrow_temperature: float = 10.0
    arrow_scaled: bool = False
    dtype: type = np.float64        # np.float32 = emulate a float32 implementation (testing the harness only)
    naive: bool = False             # with float32: sequential dot products and one-pass variance (worst-case-ish)

    def as_json(self) -> dict:
        return {"router": self.router, "top_k": self.top_k, "granularity": self.granularity,
                "sequence_length": self.sequence_length, "arrow_temperature": self.arrow_temperature,
                "arrow_scaled": self.arrow_scaled}

    def cli_args(self) -> list:
        args = ["--router", self.router, "--top-k", str(self.top_k), "--granularity", self.granularity]
        if self.granularity == "sequence":
            args += ["--sequence-length", str(self.sequence_length)]
        if self.router == "arrow":
            args += ["--arrow-temperature", repr(float(self.arrow_temperature))]
            if self.arrow_scaled:
                args.append("--arrow-scaled")
        return args


def resolve_options(library: Library, router=None, top_k=None, granularity=None, sequence_length=None,
                    arrow_temperature=None, arrow_scaled=False, dtype=np.float64, naive=False) -> ApplyOptions:
    """Command-line values override the manifest's `routing`, which overrides the defaults (phatgoose, k = 2)."""
    router = router or library.routing.get("router") or "phatgoose"
    if top_k is None:
        top_k = int(library.routing.get("top_k", 2))
    granularity = granularity or "token"
    if router not in ROUTERS:
        raise RefError(f"router '{router}': expected one of {', '.join(ROUTERS)}")
    if top_k < 1:
        raise RefError(f"top_k {top_k}: expected >= 1")
    if granularity not in ("token", "sequence"):
        raise RefError(f"granularity '{granularity}': expected token or sequence")
    if granularity == "sequence" and (sequence_length is None or sequence_length < 1):
        raise RefError("--granularity sequence needs --sequence-length >= 1")
    temp = 10.0 if arrow_temperature is None else float(arrow_temperature)
    if not temp > 0:
        raise RefError(f"arrow temperature {temp}: expected > 0")
    return ApplyOptions(router=router, top_k=top_k, granularity=granularity,
                        sequence_length=sequence_length if granularity == "sequence" else None,
                        arrow_temperature=temp, arrow_scaled=bool(arrow_scaled), dtype=dtype, naive=naive)


def layer_norm(z: np.ndarray) -> np.ndarray:
    mu = z.mean(axis=-1, keepdims=True)
    c = z - mu
    var = (c * c).mean(axis=-1, keepdims=True)
    return c / np.sqrt(var + z.dtype.type(LN_EPS))


def _layer_norm_one_pass(z: np.ndarray) -> np.ndarray:
    """var = E[z^2] - E[z]^2: the cancellation-prone form a careless implementation might use (emulation only)."""
    mu = z.mean(axis=-1, keepdims=True)
    var = np.maximum((z * z).mean(axis=-1, keepdims=True) - mu * mu, 0)
    return (z - mu) / np.sqrt(var + z.dtype.type(LN_EPS))


def _sequential_matmul_t(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """U @ V.T with each dot product accumulated strictly left to right in U's dtype (emulation only)."""
    out = np.empty((U.shape[0], V.shape[0]), dtype=U.dtype)
    step = max(1, (1 << 22) // max(1, V.shape[0] * U.shape[1]))
    for i in range(0, U.shape[0], step):
        prod = U[i:i + step, None, :] * V[None, :, :]
        out[i:i + step] = np.cumsum(prod, axis=-1, dtype=U.dtype)[..., -1]
    return out


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def routing_units(T: int, options: ApplyOptions) -> np.ndarray:
    """unit[t] = index of the routing unit (token or sequence) of token t."""
    if options.granularity == "sequence":
        return np.arange(T) // options.sequence_length
    return np.arange(T)


def router_inputs(X: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Per routing unit: the token itself, or the mean of the raw activations of its sequence."""
    n_units = int(unit.max()) + 1 if len(unit) else 0
    if n_units == len(unit):
        return X
    sums = np.zeros((n_units, X.shape[1]), dtype=X.dtype)
    np.add.at(sums, unit, X)
    counts = np.bincount(unit, minlength=n_units).astype(X.dtype)
    return sums / counts[:, None]


def scores(library: Library, module: str, Xr: np.ndarray, options: ApplyOptions) -> np.ndarray:
    """[U, n] router scores for the candidates of `module`."""
    dt = options.dtype
    d_in = Xr.shape[1]
    cand = library.candidates(module)
    if options.router == "phatgoose":
        gates = []
        for idx in cand:
            g = library.experts[idx].modules[module].gate
            if g is None:
                raise RefError(f"expert '{library.experts[idx].name}': gates.safetensors has no gate for '{module}'")
            if g.shape[0] != d_in:
                raise RefError(f"expert '{library.experts[idx].name}': gate '{module}' has {g.shape[0]} entries, "
                               f"input has {d_in}")
            gates.append(g)
        if options.naive:
            G = _layer_norm_one_pass(np.array(gates).astype(dt))
            return _sequential_matmul_t(_layer_norm_one_pass(Xr), G) / dt(math.sqrt(d_in))
        G = layer_norm(np.array(gates).astype(dt))
        return (layer_norm(Xr) @ G.T) / dt(math.sqrt(d_in))
    if options.router == "arrow":
        E = library.arrow_prototypes(module, dt)
        s = np.abs(_sequential_matmul_t(Xr, E) if options.naive else Xr @ E.T) / dt(options.arrow_temperature)
        if options.arrow_scaled:
            s = s / dt(math.sqrt(d_in))
        return s
    raise AssertionError(options.router)


@dataclass
class Route:
    candidates: np.ndarray   # [n] global expert indices, ascending
    unit: np.ndarray         # [T] routing unit of each token
    probs: np.ndarray        # [U, n] routing probabilities (uniform: 1/n)
    scores: np.ndarray | None  # [U, n] pre-softmax scores (None for uniform)
    positions: np.ndarray    # [U, k_out] candidate positions chosen (-1 = padding)
    experts: np.ndarray      # [T, k_out] int32 global expert index (-1 = padding)
    weights: np.ndarray      # [T, k_out] weights (0 at padding)


def top_k_positions(p: np.ndarray, k: int) -> np.ndarray:
    """Descending p; ties -> lower candidate position (= lower expert index) first. Pads with -1 if k > n."""
    U, n = p.shape
    order = np.argsort(-p, axis=1, kind="stable")[:, :min(k, n)]
    if k > n:
        order = np.concatenate([order, np.full((U, k - n), -1, dtype=order.dtype)], axis=1)
    return order


def topk_weights(p: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """w = p_i / (sum of chosen p + 1e-6); 0 at padding slots."""
    valid = positions >= 0
    chosen = np.where(valid, np.take_along_axis(p, np.where(valid, positions, 0), axis=1), 0)
    denom = chosen.sum(axis=1, keepdims=True) + p.dtype.type(TOPK_NORM_EPS)
    return np.where(valid, chosen / denom, 0)


def route_module(library: Library, module: str, X: np.ndarray, options: ApplyOptions) -> Route:
    dt = options.dtype
    cand = np.array(library.candidates(module), dtype=np.int64)
    if len(cand) == 0:
        raise RefError(f"input tensor '{module}': no expert in the library adapts this module")
    d_in, _ = library.module_dims(module)
    if X.ndim != 2 or X.shape[1] != d_in:
        raise RefError(f"input tensor '{module}': expected shape [T, {d_in}], found {list(X.shape)}")
    X = X.astype(dt)
    T, n = X.shape[0], len(cand)
    unit = routing_units(T, options)
    Xr = router_inputs(X, unit)
    U = Xr.shape[0]
    if options.router == "uniform":
        probs = np.full((U, n), 1.0 / n, dtype=dt)
        positions = np.tile(np.arange(n), (U, 1))
        unit_weights = np.full((U, n), dt(1.0) / dt(n), dtype=dt)
        s = None
    else:
        s = scores(library, module, Xr, options)
        probs = softmax(s)
        positions = top_k_positions(probs, options.top_k)
        unit_weights = topk_weights(probs, positions)
    unit_experts = np.where(positions >= 0, cand[np.maximum(positions, 0)], -1).astype(np.int32)
    return Route(candidates=cand, unit=unit, probs=probs, scores=s, positions=positions,
                 experts=unit_experts[unit], weights=unit_weights[unit])


def mixture_delta(library: Library, module: str, X: np.ndarray, experts: np.ndarray, weights: np.ndarray,
                  dtype=np.float64) -> np.ndarray:
    """delta[t] = sum over slots j with experts[t, j] >= 0 of weights[t, j] * scale * B (A x_t)."""
    X = X.astype(dtype)
    _, d_out = library.module_dims(module)
    out = np.zeros((X.shape[0], d_out), dtype=dtype)
    for idx in np.unique(experts[experts >= 0]):
        m = library.experts[int(idx)].modules[module]
        coef = np.where(experts == idx, weights, 0).sum(axis=1).astype(dtype)
        rows = np.nonzero((experts == idx).any(axis=1))[0]
        h = X[rows] @ m.A.T.astype(dtype)
        h *= (coef[rows] * dtype(m.scale))[:, None]
        out[rows] += h @ m.B.T.astype(dtype)
    return out


def apply(library: Library, inputs: dict, options: ApplyOptions) -> dict:
    out = {}
    for module, X in inputs.items():
        route = route_module(library, module, X, options)
        delta = mixture_delta(library, module, X, route.experts, route.weights, dtype=options.dtype)
        out[module] = delta.astype(np.float32)
        out[module + ".experts"] = route.experts.astype(np.int32)
        out[module + ".weights"] = route.weights.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    parser = _Parser(prog="phatgoose_ref.py", description="numpy reference for `phatgoose apply`")
    parser.add_argument("--float32", dest="float32_global", action="store_true",
                        help="same as `apply --float32` (so a command string can carry it)")
    parser.add_argument("--float32-naive", dest="naive_global", action="store_true",
                        help="same as `apply --float32-naive`")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ap = sub.add_parser("apply", help="route and mix a batch of activations")
    ap.add_argument("--library", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--router", choices=ROUTERS, default=None)
    ap.add_argument("--granularity", choices=("token", "sequence"), default=None)
    ap.add_argument("--sequence-length", type=int, default=None)
    ap.add_argument("--arrow-temperature", type=float, default=None)
    ap.add_argument("--arrow-scaled", action="store_true")
    ap.add_argument("--float32", action="store_true", help="compute in float32 (emulates a binary; testing only)")
    ap.add_argument("--float32-naive", action="store_true",
                    help="--float32 with sequential dot products and one-pass variance in the router (testing only)")
    args = parser.parse_args(argv)
    try:
        library = load_library(args.library)
        options = resolve_options(library, router=args.router, top_k=args.top_k, granularity=args.granularity,
                                  sequence_length=args.sequence_length, arrow_temperature=args.arrow_temperature,
                                  arrow_scaled=args.arrow_scaled,
                                  dtype=np.float32 if (args.float32 or args.float32_global or args.float32_naive
                                                       or args.naive_global) else np.float64,
                                  naive=args.float32_naive or args.naive_global)
        tensors, dtypes, _ = read_safetensors(args.input)
        for name, dtype_name in dtypes.items():
            if dtype_name != "F32":
                raise RefError(f"{args.input}: tensor '{name}': expected F32, found {dtype_name}")
        result = apply(library, tensors, options)
        write_safetensors(args.output, result)
    except RefError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyError, ValueError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

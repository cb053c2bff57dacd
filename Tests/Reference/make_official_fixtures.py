#!/usr/bin/env python3
"""Writes Tests/Fixtures/official/: small checkpoints in the layout of the official PHATGOOSE release
(r-three/phatgoose `best.pt`), malformed variants of them, and golden outputs computed by the official code.

    /root/.cache/phatgoose-venv/bin/python Tests/Reference/make_official_fixtures.py \
        [--official /tmp/pg-official] [--out Tests/Fixtures/official]

Needs PyTorch, gin-config, numpy and transformers (the official `moe.py` imports `transformers.activations`), and
an unpacked copy of the official repository. The Swift tests need none of this: they read the committed outputs.
Run once; the output is byte-for-byte the same on every run with the same torch version (torch's
`.data/serialization_id` depends only on the save order within one process, which is fixed here).

How the checkpoints are made
----------------------------
The official `save_weights` writes `torch.save(model.torch_model.state_dict())` of a HF T5 model whose linear
layers carry addons in an `nn.ModuleDict` named `_addons`; `scripts/concatenate.py` re-keys single-expert
checkpoints (`__0` -> `__i`) into one plain `OrderedDict` and `torch.save`s that. Here a small T5-shaped
`nn.Module` tree gets, on each routed linear layer, the official `ExposeHidden`, `Router` and `FFNExperts` addons
(imported from the official source, built as `make_moe` builds them, extended to 3 experts by the official
`MoELink.extend` / `ExtendableAddon.extend`), so the state-dict keys and the pickled `_metadata` are the ones the
official model produces. `extend` makes each expert's parameter a view into one stacked tensor per addon
(`nn.Parameter(stacked[i])`); the seeded values are placed the same way, so experts 1 and 2 are storage-offset
views into a shared storage. One tensor (`wi`'s `layer1__1`) is replaced by a transposed view (shape [32, 16],
strides (1, 32)), so a reader must honour storage_offset and strides. `shared.weight`, `encoder.embed_tokens.weight`
and `decoder.embed_tokens.weight` are one tied parameter (one storage), as in T5. `twelve_experts_f16.pt` has 12
experts with its keys in byte order (`__10` before `__2`), to check numeric expert order. The malformed files
come from a smaller two-module model; each has one defect (see the fixtures' README.md for what an importer must
report). No code is copied from the official repository; its classes are imported and called.

How the golden outputs are computed
-----------------------------------
By the official classes themselves: for each module a fresh official `Router` (score_type "original",
scaling_scores True, elementwise_affine False, router_type "smear") and `FFNExperts` (identity, d_bottleneck 16,
divide_by_d_bottleneck True, topk_value 2, normalize_topk True, position "beside"), with
`ExtendableAddon.separate_experts = True` bound through gin as the official eval.gin does, get the module's
`_addons.router.*` / `_addons.expert_lora.*` entries of the checkpoint (loaded with `torch.load(weights_only=True)`,
cast to float32) through their own `load_state_dict` (the official `_load_from_state_dict` discovers the experts);
then `Router._forward(x[None])` gives the routing weights [1, T, N] and `FFNExperts._forward(x[None], weights)`
the mixture delta [1, T, out] (the per-token dispatcher branch, with its 1e-6 in the top-k normalisation). The
top-k experts and weights are the values of the official `torch.topk` call inside `FFNExperts._forward`
(captured by wrapping `torch.topk` for the duration of the call), normalised by the official formula
`w / (sum(w) + 1e-6)`. Order: as torch.topk returns them, i.e. descending weight. Every decision has a score gap
of at least MIN_GAP (the seed is advanced until so), so there are no ties and the order is unambiguous; the script
asserts it. The delta is cross-checked against an independent float64 recomputation from the captured experts,
and the whole output against the repository's own numpy reference (Tests/Reference/phatgoose_ref.py) run on the
library that DESIGN.md section 3 maps the checkpoint to (lora_A = layer1^T, lora_B = layer2^T, r 16, lora_alpha 1,
gate = the router embedding): identical experts, weights within 1e-6, deltas within 1e-5 relative.

Only the official package's `__init__` files are bypassed (they import the whole training stack, which does not
import with current transformers): `src`, `src.models`, `src.models.addons` and `src.utils` are registered as bare
packages pointing at the official directories, and `moe.py`, `addon.py`, `monitor.py` and `constants.py` are
imported unmodified from there.
"""

from __future__ import annotations

import argparse
import binascii
import collections
import importlib.util
import io
import math
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tempfile
import types
import zipfile

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "Tests", "Fixtures", "official")
SEED = 20240601
MIN_GAP = 1e-3
RANK = 16
EXPERTS = 3
TOKENS = 12
D_MODEL = 32
VOCAB = 24
MARKER = "/tmp/phatgoose-pwned-marker"

Q = "encoder.block.0.layer.0.SelfAttention.q"
WI = "encoder.block.0.layer.1.DenseReluDense.wi"
WO = "encoder.block.0.layer.1.DenseReluDense.wo"
K = "decoder.block.0.layer.1.EncDecAttention.k"
TINY_MODULES = [(Q, 32, 32), (WI, 32, 48), (WO, 48, 32), (K, 32, 32)]
TRANSPOSED = (WI, 1)  # (module, expert) whose layer1 is stored transposed

# The malformed checkpoints use a smaller model: two modules of width 16/24, the same 3 experts of rank 16.
MINI_Q = Q
MINI_WO = WO
MINI_MODULES = [(MINI_Q, 16, 16), (MINI_WO, 24, 16)]

# Twelve experts on one narrow module, to check that experts are ordered by their number (10 after 9).
TWELVE = "encoder.block.0.layer.0.SelfAttention.o"
TWELVE_MODULES = [(TWELVE, 8, 8)]
TWELVE_EXPERTS = 12

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# Every pickle opcode and global that the tiny and malformed-but-safe checkpoints may contain; the script fails if
# torch starts writing anything else, so the Swift reader's allow-list can be checked against this list.
EXPECTED_OPCODES = {"PROTO", "GLOBAL", "BINPUT", "BINGET", "LONG_BINPUT", "LONG_BINGET", "EMPTY_TUPLE", "REDUCE",
                    "MARK", "BINUNICODE", "BININT1", "BININT2", "BININT", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
                    "BINPERSID", "NEWFALSE", "NEWTRUE", "EMPTY_DICT", "SETITEM", "SETITEMS", "BUILD", "STOP"}
EXPECTED_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage",
                    "torch BFloat16Storage", "torch HalfStorage"}


# ----------------------------------------------------------------------------------------------------------------
# The official code

def import_official(root):
    """The official `Router`, `FFNExperts`, `MoELink`, `ExposeHidden` classes, imported unmodified from `root`."""
    for name, path in [("src", "src"), ("src.models", "src/models"), ("src.models.addons", "src/models/addons"),
                       ("src.utils", "src/utils")]:
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, path)]
        sys.modules[name] = package
    sys.path.insert(0, root)
    import gin
    from src.models.addons.moe import FFNExperts, MoELink, Router  # noqa: E402
    from src.models.addons.monitor import ExposeHidden  # noqa: E402
    gin.bind_parameter("ExtendableAddon.separate_experts", True)  # as colm/experiments/eval.gin
    return types.SimpleNamespace(Router=Router, FFNExperts=FFNExperts, MoELink=MoELink, ExposeHidden=ExposeHidden,
                                 moe=sys.modules["src.models.addons.moe"])


def official_router(official, host, name, link):
    return official.Router(host_module=host, global_hidden_dict={}, read_hidden_key=("pre_expose_hiddens", name),
                           write_routing_weights_key=("routing_weights", "router", name), moe_link=link,
                           d_router="host_module.in_features", position="before", router_type="smear",
                           score_type="original", scaling_scores=True, elementwise_affine=False)


def official_experts(official, host, name, link):
    return official.FFNExperts(host_module=host, global_hidden_dict={},
                               read_routing_weights_key=("routing_weights", "router", name), moe_link=link,
                               d_in="host_module.in_features", d_out="host_module.out_features", d_bottleneck=RANK,
                               non_linearity="identity", normalize_topk=True, topk_value=2, position="beside",
                               divide_by_d_bottleneck=True)


# ----------------------------------------------------------------------------------------------------------------
# Values

def make_values(rng, modules, n):
    """Per module: gates [n, in], layer1 [n, in, r], layer2 [n, r, out], base weight [out, in], input x [T, in].

    Tokens are drawn near mixtures of two experts' (normalised) gates, with a different leading expert per token
    (random, or token t led by expert t when n = T), plus noise, an offset and a scale (LayerNorm removes those),
    so routing is non-trivial."""
    values = {}
    for name, d_in, d_out in modules:
        gates = rng.normal(0.0, 1.0, (n, d_in)) * rng.uniform(0.2, 2.0, (n, 1)) + rng.normal(0, 0.3, (n, 1))
        layer1 = rng.normal(0.0, 1.0, (n, d_in, RANK)) / math.sqrt(d_in)
        layer2 = rng.normal(0.0, 1.0, (n, RANK, d_out)) / math.sqrt(RANK)
        base = rng.normal(0.0, 1.0, (d_out, d_in)) / math.sqrt(d_in)
        unit = (gates - gates.mean(1, keepdims=True)) / gates.std(1, keepdims=True)
        x = np.empty((TOKENS, d_in))
        for t in range(TOKENS):
            first = t if n == TOKENS else (t + rng.integers(0, n)) % n
            second = (first + 1 + rng.integers(0, n - 1)) % n
            mix = unit[first] * rng.uniform(0.6, 1.0) + unit[second] * rng.uniform(0.0, 0.7)
            x[t] = (mix + rng.normal(0.0, 0.8, d_in)) * rng.uniform(0.5, 3.0) + rng.normal(0.0, 1.0)
        values[name] = dict(gates=gates, layer1=layer1, layer2=layer2, base=base, x=x)
    return values


def layer_norm64(z):
    z = np.asarray(z, dtype=np.float64)
    mean = z.mean(-1, keepdims=True)
    return (z - mean) / np.sqrt(((z - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def scores64(x, gates):
    return layer_norm64(x) @ layer_norm64(gates).T / math.sqrt(x.shape[-1])


def routing_is_clear(values):
    """Every token at every module and in every dtype: the three best scores (which decide the top 2 and their
    order) at least MIN_GAP apart, and every expert leads at least one token per module."""
    for v in values.values():
        n = v["gates"].shape[0]
        for dtype in DTYPES.values():
            gates = torch.from_numpy(v["gates"]).to(dtype).to(torch.float64).numpy()
            s = np.sort(scores64(v["x"].astype(np.float32), gates), axis=1)[:, ::-1][:, :3]
            if np.min(-np.diff(s, axis=1)) < MIN_GAP:
                return False
            if len(set(np.argmax(scores64(v["x"], gates), axis=1))) != n:
                return False
    return True


def seeded_values(modules, seed, n=EXPERTS):
    while True:
        values = make_values(np.random.default_rng(seed), modules, n)
        if routing_is_clear(values):
            return values, seed
        seed += 1


# ----------------------------------------------------------------------------------------------------------------
# The model and its state dict

class Tree(nn.Module):
    """A plain container, so that state-dict names follow the T5 module paths."""


def child(parent, path):
    node = parent
    for part in path.split("."):
        if not hasattr(node, part):
            node.add_module(part, Tree())
        node = getattr(node, part)
    return node


def place(addon, name, stacked):
    """Each expert's parameter as a view into one stacked tensor, exactly as `ExtendableAddon.extend` places the
    tensors it creates (`setattr(self, f"{name}_{identifier}", nn.Parameter(new_parameter_data[idx]))`)."""
    for i in range(stacked.shape[0]):
        setattr(addon, f"{name}__{i}", nn.Parameter(stacked[i]))


def build_model(official, modules, values, dtype, transposed=None, extra_keys=True):
    """A T5-shaped module tree with the official addons on each routed linear layer, holding `values` in `dtype`."""
    torch.manual_seed(0)  # `extend` draws its own initial values; they are all overwritten below
    root = Tree()
    widths = {name: (d_in, d_out) for name, d_in, d_out in modules}

    def add_host(name):
        d_in, d_out = widths[name]
        v = values[name]
        parent, leaf = name.rsplit(".", 1)
        host = nn.Linear(d_in, d_out, bias=False, dtype=dtype)
        with torch.no_grad():
            host.weight.copy_(torch.from_numpy(v["base"]))
        child(root, parent).add_module(leaf, host)
        host._addons = nn.ModuleDict()
        link = official.MoELink()
        host._addons["pre_expose_hiddens"] = official.ExposeHidden(
            host_module=host, global_hidden_dict={}, write_hidden_key=("pre_expose_hiddens", name),
            read_mask_key=("mask", "prepare_mask", "encoder"), reduction_method=None, position="before")
        router = official_router(official, host, name, link)
        host._addons["router"] = router
        experts = official_experts(official, host, name, link)
        host._addons["expert_lora"] = experts
        n = v["gates"].shape[0]
        link.extend(n, "")                            # identifiers "_0", "_1", ...: keys "...__0" etc.
        router.extend(n, "from_scratch")
        experts.extend(n, "from_scratch")
        place(router, "expert_embeddings", torch.from_numpy(v["gates"]).to(dtype))
        place(experts, "layer1", torch.from_numpy(v["layer1"]).to(dtype))
        place(experts, "layer2", torch.from_numpy(v["layer2"]).to(dtype))
        if transposed and transposed[0] == name:
            i = transposed[1]
            stored = torch.from_numpy(np.ascontiguousarray(v["layer1"][i].T)).to(dtype)  # [r, in] in memory
            setattr(experts, f"layer1__{i}", nn.Parameter(stored.t()))             # [in, r], strides (1, in)

    def add_param(path, shape, rng_seed):
        parent, leaf = path.rsplit(".", 1)
        data = torch.from_numpy(np.random.default_rng(rng_seed).normal(0.0, 1.0, shape)).to(dtype)
        child(root, parent).register_parameter(leaf, nn.Parameter(data))

    names = [name for name, _, _ in modules]
    if extra_keys:
        root.shared = nn.Embedding(VOCAB, D_MODEL, dtype=dtype)
        with torch.no_grad():
            root.shared.weight.copy_(torch.from_numpy(np.random.default_rng(1).normal(0.0, 1.0, (VOCAB, D_MODEL))))
        child(root, "encoder").embed_tokens = root.shared  # tied, as in T5
    for name in [n for n in names if n.startswith("encoder.")]:
        if extra_keys and name == Q:
            add_param("encoder.block.0.layer.0.layer_norm.weight", (D_MODEL,), 2)
        add_host(name)
    if extra_keys:
        add_param("encoder.final_layer_norm.weight", (D_MODEL,), 3)
        child(root, "decoder").embed_tokens = root.shared
    for name in [n for n in names if n.startswith("decoder.")]:
        add_host(name)
    if extra_keys:
        root.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False, dtype=dtype)
        with torch.no_grad():
            root.lm_head.weight.copy_(torch.from_numpy(np.random.default_rng(4).normal(0.0, 1.0, (VOCAB, D_MODEL))))
    return root


# ----------------------------------------------------------------------------------------------------------------
# Writing

def save(obj, path, **kwargs):
    torch.save(obj, path, **kwargs)
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes)")


def load_safetensors_module():
    spec = importlib.util.spec_from_file_location("phatgoose_safetensors",
                                                  os.path.join(REPO, "python", "phatgoose", "safetensors.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def repack_zip64(source, target, alignment=64):
    """`source`'s entries, in order and byte for byte, as STORED entries of a new archive with ZIP64 records forced
    in every form a large torch checkpoint can have them. Python's zipfile (force_zip64=True) only adds the ZIP64
    extra to *local* headers, so the archive is written here by hand. What torch 2.15 (miniz) writes beyond 4 GiB,
    observed on a 4 GiB + 1 KiB tensor: an entry of 4 GiB or more gets central sizes 0xFFFFFFFF and a ZIP64 extra
    (0x0001) [uncompressed, compressed]; an entry whose local header starts at or beyond 4 GiB gets central offset
    0xFFFFFFFF and a ZIP64 extra [offset]; the end record then has offset 0xFFFFFFFF (the ZIP64 end record and
    locator are written always, even for tiny files). Here, cycling over the entries:

    - entry 3j:   central sizes and offset 0xFFFFFFFF, central ZIP64 extra [uncompressed, compressed, offset];
    - entry 3j+1: only the offset forced: central ZIP64 extra [offset] (an ordinary tensor beyond 4 GiB);
    - entry 3j+2: only the sizes forced: central ZIP64 extra [uncompressed, compressed] (a tensor of 4 GiB or more);
    - local headers: CRC and sizes filled in (no data descriptor, unlike torch), sizes 0xFFFFFFFF and a local ZIP64
      extra [uncompressed, compressed] where the central sizes are forced; data aligned to `alignment` bytes by a
      padding extra field (id 0x4246 "FB", as torch pads); version needed 45;
    - ZIP64 end of central directory record and locator, then an end record whose counts are 0xFFFF and whose size
      and offset are 0xFFFFFFFF, so only the ZIP64 record has the real values.
    """
    with zipfile.ZipFile(source) as z:
        entries = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    out = io.BytesIO()
    central = []
    for index, (name, data) in enumerate(entries):
        name_bytes = name.encode("utf-8")
        crc = binascii.crc32(data) & 0xFFFFFFFF
        force_sizes, force_offset = index % 3 in (0, 2), index % 3 in (0, 1)
        offset = out.tell()
        zip64_local = struct.pack("<HHQQ", 0x0001, 16, len(data), len(data)) if force_sizes else b""
        fixed = 30 + len(name_bytes) + len(zip64_local) + 4
        pad = -(offset + fixed) % alignment
        extra = zip64_local + struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        size32 = 0xFFFFFFFF if force_sizes else len(data)
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0x0800, 0, 0, 0, crc, size32, size32,
                              len(name_bytes), len(extra)))
        out.write(name_bytes + extra)
        assert out.tell() % alignment == 0
        out.write(data)
        fields = ([len(data), len(data)] if force_sizes else []) + ([offset] if force_offset else [])
        central_extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0x0800, 0, 0, 0, crc, size32, size32,
                                   len(name_bytes), len(central_extra), 0, 0, 0, 0,
                                   0xFFFFFFFF if force_offset else offset)
                       + name_bytes + central_extra)
    cd_offset = out.tell()
    for record in central:
        out.write(record)
    cd_size = out.tell() - cd_offset
    eocd64_offset = out.tell()
    out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries), len(entries), cd_size, cd_offset))
    out.write(struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    with open(target, "wb") as f:
        f.write(out.getvalue())
    print(f"wrote {os.path.relpath(target, REPO)} ({os.path.getsize(target)} bytes)")


def make_legacy_deterministic(path):
    """torch's legacy format names each storage by its memory address (`str(storage._cdata)`) and writes the raw
    storages after the pickles in sorted-name order, so both differ from run to run. Rename the storages to fixed
    names of the same length in order of first use, and rewrite the key list and the raw storages in that order;
    everything else stays as torch wrote it. (All storages here are float32: 4 bytes an element.)"""
    with open(path, "rb") as f:
        data = f.read()
    first_use = []

    class Keys(pickle.Unpickler):
        def persistent_load(self, pid):
            if pid[2] not in first_use:
                first_use.append(pid[2])

        def find_class(self, module, name):
            if module.startswith("torch"):
                return lambda *args, **kwargs: None
            return super().find_class(module, name)

    stream = io.BytesIO(data)
    unpickler = Keys(stream)
    for _ in range(3):  # magic number, protocol version, sys_info
        unpickler.load()
    main_begin = stream.tell()
    unpickler.load()
    main_end = stream.tell()
    keys = unpickler.load()
    storages_begin = stream.tell()
    assert sorted(keys) == sorted(first_use) and len({len(k) for k in keys}) == 1, keys
    raw, cursor = {}, storages_begin
    for key in keys:
        (numel,) = struct.unpack_from("<q", data, cursor)
        raw[key] = data[cursor:cursor + 8 + 4 * numel]
        cursor += 8 + 4 * numel
    assert cursor == len(data)
    renamed = {key: str(10 ** (len(key) - 1) + index) for index, key in enumerate(first_use)}
    main = data[main_begin:main_end]
    for key, fixed in renamed.items():
        old, new = (b"X" + struct.pack("<I", len(k)) + k.encode() for k in (key, fixed))
        assert main.count(old) >= 1, key  # once per tensor on the storage (torch builds a new key string each time)
        main = main.replace(old, new)
    new_keys = [renamed[key] for key in first_use]  # already sorted: same length, increasing
    with open(path, "wb") as f:
        f.write(data[:main_begin] + main + pickle.dumps(new_keys, protocol=2)
                + b"".join(raw[key] for key in first_use))


class _Reduce:
    """An object whose pickle is `GLOBAL <function>` + `REDUCE` on `args`: what a malicious checkpoint carries."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def write_malicious(path, function, args):
    state = collections.OrderedDict()
    state[f"{MINI_Q}.weight"] = torch.arange(16 * 16, dtype=torch.float32).reshape(16, 16) / 256
    state[f"{MINI_Q}._addons.router.expert_embeddings__0"] = _Reduce(function, args)
    save(state, path)


def confirm_malicious(path):
    """In a throwaway directory: python's own unrestricted pickle (with a persistent_load that only hands back the
    storage key) runs the payload; torch.load(weights_only=True) refuses it. The marker is deleted afterwards."""
    with tempfile.TemporaryDirectory() as sandbox:
        if os.path.exists(MARKER):
            os.remove(MARKER)
        probe = (
            "import pickle, sys, zipfile\n"
            "z = zipfile.ZipFile(sys.argv[1])\n"
            "name = [n for n in z.namelist() if n.endswith('/data.pkl')][0]\n"
            "class U(pickle.Unpickler):\n"
            "    def persistent_load(self, pid): return pid\n"
            "    def find_class(self, module, name):\n"
            "        if module.startswith('torch'): return lambda *a, **k: None\n"
            "        return super().find_class(module, name)\n"
            "U(z.open(name)).load()\n")
        subprocess.run([sys.executable, "-c", probe, path], cwd=sandbox, check=True, capture_output=True)
        ran = os.path.exists(MARKER)
        if ran:
            os.remove(MARKER)
        refused = subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=True)",
                                  path], cwd=sandbox, capture_output=True)
        if os.path.exists(MARKER):
            os.remove(MARKER)
            raise SystemExit(f"{path}: torch.load(weights_only=True) ran the payload")
    if not ran:
        raise SystemExit(f"{path}: unrestricted pickle did not run the payload")
    if refused.returncode == 0:
        raise SystemExit(f"{path}: torch.load(weights_only=True) accepted it")
    print(f"  {os.path.basename(path)}: unrestricted pickle ran the payload (marker created, then deleted); "
          f"torch.load(weights_only=True) refused it")


# ----------------------------------------------------------------------------------------------------------------
# Golden outputs

def golden(official, checkpoint, modules, inputs, n=EXPERTS):
    """The official Router and FFNExperts on `checkpoint`'s experts, in float32: per module the delta, the top-k
    experts and weights (apply's output layout)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    out = {}
    for name, d_in, d_out in modules:
        host = nn.Linear(d_in, d_out, bias=False)
        link = official.MoELink()
        router = official_router(official, host, name, link)
        experts = official_experts(official, host, name, link)
        for addon, prefix in [(router, f"{name}._addons.router."), (experts, f"{name}._addons.expert_lora.")]:
            part = collections.OrderedDict((k[len(prefix):], v.to(torch.float32)) for k, v in state.items()
                                           if k.startswith(prefix))
            addon.load_state_dict(part, strict=True)
        assert router.num_experts == experts.num_experts == n, (name, router.num_experts)
        assert link.expert_identifiers == [f"_{i}" for i in range(n)], link.expert_identifiers  # numeric order
        x = torch.from_numpy(inputs[name]).to(torch.float32)
        captured = []
        real_topk = torch.topk

        def topk(*args, **kwargs):
            result = real_topk(*args, **kwargs)
            captured.append(result)
            return result

        with torch.no_grad():
            routing = router._forward(x[None])                       # [1, T, N]
            official.moe.torch.topk = topk
            try:
                delta = experts._forward(x[None], routing)[0]        # [T, out]
            finally:
                official.moe.torch.topk = real_topk
        assert len(captured) == 1
        top_w, top_i = captured[0]
        weights = top_w / (torch.sum(top_w, dim=-1, keepdim=True) + experts.epsilon)   # as in FFNExperts._forward
        experts_i = top_i.to(torch.int32).numpy()
        # No ties: the order torch.topk returned is descending probability with a clear gap.
        p = routing[0].to(torch.float64).numpy()
        chosen = np.take_along_axis(p, experts_i.astype(np.int64), axis=1)
        assert np.all(chosen[:, 0] > chosen[:, 1]), f"{name}: a tie or an unordered top-k"
        # Cross-check the official delta with an independent float64 recomputation from the captured choice.
        check = np.zeros((TOKENS, d_out))
        x64 = x.to(torch.float64).numpy()
        for t in range(TOKENS):
            for slot in range(2):
                e = int(experts_i[t, slot])
                a = state[f"{name}._addons.expert_lora.layer1__{e}"].to(torch.float64).numpy()
                b = state[f"{name}._addons.expert_lora.layer2__{e}"].to(torch.float64).numpy()
                check[t] += float(weights[t, slot]) * (x64[t] @ a @ b) / RANK
        error = np.max(np.abs(check - delta.numpy())) / max(np.max(np.abs(check)), 1e-30)
        assert error < 1e-5, (name, error)
        out[name] = delta.numpy().astype(np.float32)
        out[f"{name}.experts"] = experts_i
        out[f"{name}.weights"] = weights.numpy().astype(np.float32)
    return out


def cross_check_design_mapping(checkpoint, modules, inputs, expected, safetensors, n=EXPERTS):
    """The official outputs equal the repository's independent reference (phatgoose_ref.py, float64) run on the
    library that DESIGN.md section 3 maps the checkpoint to: lora_A = layer1^T, lora_B = layer2^T, r 16,
    lora_alpha 1, gate = the router embedding. Written to a temporary directory and deleted."""
    sys.path.insert(0, HERE)
    import phatgoose_ref as ref  # noqa: E402
    import json
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as library:
        names = [f"expert{i:02d}" for i in range(n)]
        for i, expert in enumerate(names):
            os.makedirs(os.path.join(library, expert))
            weights, gates = {}, {}
            for name, _, _ in modules:
                f32 = lambda key: state[key].to(torch.float32).numpy()  # noqa: E731
                weights[f"base_model.model.{name}.lora_A.weight"] = f32(f"{name}._addons.expert_lora.layer1__{i}").T
                weights[f"base_model.model.{name}.lora_B.weight"] = f32(f"{name}._addons.expert_lora.layer2__{i}").T
                gates[name] = f32(f"{name}._addons.router.expert_embeddings__{i}")
            safetensors.save(os.path.join(library, expert, "adapter_model.safetensors"), weights)
            safetensors.save(os.path.join(library, expert, "gates.safetensors"), gates)
            with open(os.path.join(library, expert, "adapter_config.json"), "w") as f:
                json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": 1,
                           "target_modules": sorted({n.rsplit(".", 1)[1] for n, _, _ in modules})}, f)
        with open(os.path.join(library, "library.json"), "w") as f:
            json.dump({"format": "phatgoose-library", "version": 1,
                       "experts": [{"name": n, "path": n} for n in names],
                       "routing": {"router": "phatgoose", "top_k": 2}}, f)
        lib = ref.load_library(library)
        reference = ref.apply(lib, inputs, ref.resolve_options(lib))
    for name, _, _ in modules:
        assert np.array_equal(reference[f"{name}.experts"], expected[f"{name}.experts"]), name
        assert np.max(np.abs(reference[f"{name}.weights"] - expected[f"{name}.weights"])) < 1e-6, name
        scale = max(float(np.max(np.abs(reference[name]))), 1e-30)
        assert np.max(np.abs(reference[name] - expected[name])) / scale < 1e-5, name


# ----------------------------------------------------------------------------------------------------------------
# Pickle inventory

def pickle_inventory(path):
    """(opcodes, globals) of the data.pkl inside the torch zip at `path`."""
    with zipfile.ZipFile(path) as z:
        name = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
        data = z.read(name)
    opcodes, globals_ = set(), set()
    for opcode, arg, _ in pickletools.genops(data):
        opcodes.add(opcode.name)
        if opcode.name == "GLOBAL":
            globals_.add(arg)
    return opcodes, globals_


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default="/tmp/pg-official", help="the unpacked r-three/phatgoose repository")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    official = import_official(args.official)
    safetensors = load_safetensors_module()
    out = args.out
    if os.path.isdir(out):
        for entry in os.listdir(out):
            if entry.endswith((".pt", ".safetensors")):
                os.remove(os.path.join(out, entry))
    os.makedirs(out, exist_ok=True)
    p = lambda name: os.path.join(out, name)  # noqa: E731

    values, seed = seeded_values(TINY_MODULES, SEED)
    print(f"tiny values: seed {seed} (scores of every token at least {MIN_GAP} apart in every dtype)")

    # tiny_f32 and tiny_bf16: the state dict of the model itself (an OrderedDict with `_metadata`, as save_weights);
    # tiny_f16: the same tensors re-collected into a fresh OrderedDict (no `_metadata`), as concatenate.py writes.
    for tag in ["f32", "bf16", "f16"]:
        model = build_model(official, TINY_MODULES, values, DTYPES[tag], transposed=TRANSPOSED)
        state = model.state_dict()
        if tag == "f16":
            state = collections.OrderedDict(state.items())
        else:
            assert hasattr(state, "_metadata")
        layer1 = state[f"{TRANSPOSED[0]}._addons.expert_lora.layer1__{TRANSPOSED[1]}"]
        assert not layer1.is_contiguous() and layer1.stride() == (1, layer1.shape[0])
        assert state[f"{Q}._addons.expert_lora.layer1__2"].storage_offset() > 0
        tied = {state[k].untyped_storage().data_ptr() for k in ("shared.weight", "decoder.embed_tokens.weight")}
        assert len(tied) == 1
        save(state, p(f"tiny_{tag}.pt"))

    repack_zip64(p("tiny_f32.pt"), p("tiny_zip64.pt"))
    reloaded, original = (torch.load(p(n), weights_only=True) for n in ("tiny_zip64.pt", "tiny_f32.pt"))
    assert list(reloaded) == list(original) and all(torch.equal(reloaded[k], original[k]) for k in original)

    inputs = {name: values[name]["x"].astype(np.float32) for name, _, _ in TINY_MODULES}
    safetensors.save(p("input.safetensors"), inputs)
    print(f"wrote {os.path.relpath(p('input.safetensors'), REPO)}")
    for tag in ["f32", "bf16", "f16"]:
        expected = golden(official, p(f"tiny_{tag}.pt"), TINY_MODULES, inputs)
        cross_check_design_mapping(p(f"tiny_{tag}.pt"), TINY_MODULES, inputs, expected, safetensors)
        safetensors.save(p(f"expected_{tag}.safetensors"), expected)
        summary = ", ".join(f"{name.split('.')[-1]}: " + "".join(str(e) for e in expected[f"{name}.experts"][:, 0])
                            for name, _, _ in TINY_MODULES)
        print(f"wrote {os.path.relpath(p(f'expected_{tag}.safetensors'), REPO)} (first choices per token: {summary})")

    # Twelve experts on one module, keys in byte order (__0, __1, __10, __11, __2, ...) in a plain OrderedDict:
    # the official loader orders experts by the integer after "__", so expert 10 is index 10, not 2.
    twelve_values, seed12 = seeded_values(TWELVE_MODULES, SEED, n=TWELVE_EXPERTS)
    print(f"twelve-expert values: seed {seed12}")
    state = build_model(official, TWELVE_MODULES, twelve_values, torch.float16, extra_keys=False).state_dict()
    save(collections.OrderedDict(sorted(state.items())), p("twelve_experts_f16.pt"))
    inputs12 = {name: twelve_values[name]["x"].astype(np.float32) for name, _, _ in TWELVE_MODULES}
    safetensors.save(p("input_twelve.safetensors"), inputs12)
    expected = golden(official, p("twelve_experts_f16.pt"), TWELVE_MODULES, inputs12, n=TWELVE_EXPERTS)
    cross_check_design_mapping(p("twelve_experts_f16.pt"), TWELVE_MODULES, inputs12, expected, safetensors,
                               n=TWELVE_EXPERTS)
    safetensors.save(p("expected_twelve_f16.safetensors"), expected)
    print(f"wrote input_twelve.safetensors, expected_twelve_f16.safetensors (first choices: "
          f"{[int(e) for e in expected[f'{TWELVE}.experts'][:, 0]]})")

    # Malformed checkpoints, from the smaller model.
    mini_values, _ = seeded_values(MINI_MODULES, SEED)
    def mini_state():
        return build_model(official, MINI_MODULES, mini_values, torch.float32, extra_keys=False).state_dict()

    write_malicious(p("malicious.pt"), os.system, (f"touch {MARKER}",))
    confirm_malicious(p("malicious.pt"))
    write_malicious(p("malicious_exec.pt"), exec, (f"open({MARKER!r}, 'w').write('pwned')",))
    confirm_malicious(p("malicious_exec.pt"))

    save(mini_state(), p("legacy.pt"), _use_new_zipfile_serialization=False)
    make_legacy_deterministic(p("legacy.pt"))
    legacy, mini = torch.load(p("legacy.pt"), weights_only=True), mini_state()
    assert list(legacy) == list(mini) and all(torch.equal(legacy[k], mini[k]) for k in mini)

    with open(p("tiny_f32.pt"), "rb") as f:
        data = f.read()
    with open(p("truncated.pt"), "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    print(f"wrote {os.path.relpath(p('truncated.pt'), REPO)} ({int(len(data) * 0.6)} of {len(data)} bytes)")

    state = mini_state()
    del state[f"{MINI_WO}._addons.expert_lora.layer2__1"]
    save(state, p("missing_layer2.pt"))

    state = mini_state()
    del state[f"{MINI_Q}._addons.router.expert_embeddings__2"]
    save(state, p("missing_embedding.pt"))

    state = mini_state()
    for key in [k for k in state if k.endswith("__1")]:
        del state[key]
    save(state, p("index_gap.pt"))

    state = mini_state()
    state[f"{MINI_WO}._addons.expert_lora.layer2__1"] = torch.ones(8, 16) / 8       # rank 8, layer1 has 16
    save(state, p("shape_mismatch.pt"))

    state = mini_state()
    state[f"{MINI_Q}._addons.router.expert_embeddings__0"] = torch.ones(12)           # layer1__0 is [16, 16]
    save(state, p("shape_mismatch_embedding.pt"))

    state = mini_state()
    for key in [k for k in state if "._addons." in k]:
        del state[key]
    save(state, p("no_experts.pt"))

    # The inventory the Swift reader is checked against.
    print("pickle inventory (data.pkl):")
    for name in sorted(os.listdir(out)):
        if not name.endswith(".pt") or name in ("legacy.pt", "truncated.pt"):
            continue
        opcodes, globals_ = pickle_inventory(p(name))
        if not name.startswith("malicious"):
            assert opcodes <= EXPECTED_OPCODES, (name, opcodes - EXPECTED_OPCODES)
            assert globals_ <= EXPECTED_GLOBALS, (name, globals_ - EXPECTED_GLOBALS)
        print(f"  {name}: globals {sorted(globals_)}; opcodes {sorted(opcodes)}")
    total = sum(os.path.getsize(p(n)) for n in os.listdir(out))
    print(f"torch {torch.__version__}; {total} bytes in {os.path.relpath(out, REPO)}")


if __name__ == "__main__":
    main()

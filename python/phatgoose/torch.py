"""PHATGOOSE routing inside a PyTorch model: the runtime's mixture delta added to the model's own linear layers.

    import phatgoose.torch as pgt
    handle = pgt.attach(model, "library_dir", top_k=2)        # every nn.Linear named like a library module
    with torch.inference_mode():
        out = model.generate(**inputs)
    handle.detach()                                          # the model is as it was

`attach` registers a forward hook on each `torch.nn.Linear` of `model` whose qualified name (`model.named_modules()`)
is a module of the library. The hook hands the layer's input ([..., in], flattened to T rows) and its output
([..., out], holding W x + b) to the runtime, which adds the mixture delta into the output in place: no copy of
either when the input is a contiguous float32 CPU tensor (a non-contiguous input is copied once). It is for
inference only: a layer whose output would need a gradient is refused, as are tensors that are not float32 or not
on the CPU.

`attach_reference` puts the same math, written in plain PyTorch from DESIGN.md §1 and reading the library's
safetensors itself, behind the same interface: the tests' reference and the speed peer (docs/realmodel.md).

Worker threads: the hooks run on the thread that runs the model, between PyTorch's own parallel regions, and the
runtime's workers would compete with PyTorch's OpenMP threads for the same cores. So `attach` defaults to
`workers=0` (the calling thread does the routing alone); docs/realmodel.md has the measurements behind this.
"""

import collections
import json
import math
import os

import numpy as np
import torch

from . import _native
from ._errors import error_for, invalid, shape

# The runtime's worker threads inside a PyTorch forward pass: none (docs/realmodel.md, "Threads").
DEFAULT_WORKERS = 0

Route = collections.namedtuple("Route", ["module", "experts", "weights"])
Route.__doc__ = ("One layer call's routing: the module's name, each token's expert indices [..., slots] (int32, -1 "
                 "for a padded slot; the leading axes are the input's) and their mixture weights (float32).")


class Recorder:
    """The routing of every hooked layer call while recording is on, in call order (`records`, a list of Route)."""

    def __init__(self, experts, enabled=True):
        self.experts = list(experts)
        self.enabled = enabled
        self.records = []

    def clear(self):
        self.records.clear()

    def by_module(self):
        """{module: [Route, ...]} in call order."""
        grouped = {}
        for route in self.records:
            grouped.setdefault(route.module, []).append(route)
        return grouped

    def shares(self):
        """Each expert's share of the routing weight over every recorded token and module, {name: share}."""
        totals = np.zeros(len(self.experts))
        for route in self.records:
            valid = route.experts >= 0
            np.add.at(totals, route.experts[valid], route.weights[valid])
        totals /= max(totals.sum(), 1e-30)
        return dict(zip(self.experts, totals.tolist()))


class Handle:
    """What `attach` returns: `detach()` (idempotent) removes every hook and, when `attach` opened it, closes the
    runtime. Also a context manager. `modules` lists the hooked module names in model order; `recorder` is the
    Recorder (None unless `record=True`); `runtime` the phatgoose.Runtime (None for the reference)."""

    def __init__(self, hooks, modules, recorder, runtime=None, owns_runtime=False):
        self._hooks = hooks
        self.modules = modules
        self.recorder = recorder
        self.runtime = runtime
        self._owns_runtime = owns_runtime

    @property
    def attached(self):
        return bool(self._hooks)

    def detach(self):
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook.remove()
        if self._owns_runtime and self.runtime is not None:
            self.runtime.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def _bind(model, modules):
    """[(name, nn.Linear)] in model order for `modules` ({name: (in, out)}); refuses (the first in model order) a
    module that is not an nn.Linear or whose widths differ, then a library module the model lacks."""
    bound = [(name, layer) for name, layer in model.named_modules() if name in modules]
    for name, layer in bound:
        in_width, out_width = modules[name]
        if not isinstance(layer, torch.nn.Linear):
            raise invalid(f"module '{name}': expected a torch.nn.Linear, found {type(layer).__name__}")
        if (layer.in_features, layer.out_features) != (in_width, out_width):
            raise shape(f"module '{name}': the library maps {in_width} -> {out_width} features, the model's layer "
                        f"{layer.in_features} -> {layer.out_features}")
    missing = [name for name in modules if name not in dict(bound)]
    if missing:
        raise invalid(f"module '{missing[0]}': expected a module of the model named like the library's, found none "
                      f"({len(missing)} of the library's {len(modules)} modules are missing)")
    return bound


def _checked_input(name, x, output, in_width):
    """The layer's input as a contiguous float32 CPU tensor (itself when it is one), after the inference-only
    checks; raises naming the module."""
    if x.device.type != "cpu" or output.device.type != "cpu":
        raise invalid(f"module '{name}': expected tensors on the CPU, found {x.device}")
    if x.dtype != torch.float32 or output.dtype != torch.float32:
        raise invalid(f"module '{name}': expected float32 tensors, found {x.dtype} (use model.float())")
    if output.requires_grad:
        raise invalid(f"module '{name}': expected inference (torch.no_grad() or torch.inference_mode()), found a "
                      "tensor that requires grad; phatgoose.torch does not compute gradients")
    if x.shape[-1] != in_width:
        raise shape(f"module '{name}': expected inputs [..., {in_width}], found {list(x.shape)}")
    return x if x.is_contiguous() else x.contiguous()


def attach(model, library, *, top_k=None, router=None, record=False, **runtime_options):
    """Adds the runtime's mixture delta to every `torch.nn.Linear` of `model` named like a module of `library` (a
    library directory or packed file, an open phatgoose.Library, or an open phatgoose.Runtime to share) and returns
    a Handle. `top_k`, `router` and `runtime_options` (workers, arrow_temperature, ...: see phatgoose.Runtime) open
    the runtime; `workers` defaults to DEFAULT_WORKERS. With `record`, the handle's recorder keeps every call's
    routing. Raises a phatgoose.Error (a ValueError) naming the module when a library module is missing from the
    model, is not a Linear layer or has other widths; the hooks raise the same for tensors that are not float32,
    not on the CPU, or that require grad."""
    from ._runtime import Runtime
    if isinstance(library, Runtime):
        if top_k is not None or router is not None or runtime_options:
            raise invalid("runtime: an open Runtime carries its own options; pass top_k, router and the others "
                          "when opening it")
        runtime, owns = library, False
    else:
        runtime_options.setdefault("workers", DEFAULT_WORKERS)
        runtime, owns = Runtime(library, top_k=top_k, router=router, **runtime_options), True
    try:
        modules = {m.name: (m.in_width, m.out_width) for m in runtime.modules}
        bound = _bind(model, modules)
        recorder = Recorder(runtime.experts) if record else None
        hooks = [layer.register_forward_hook(_runtime_hook(runtime, runtime.layer(name), recorder))
                 for name, layer in bound]
    except BaseException:
        if owns:
            runtime.close()
        raise
    return Handle(hooks, [name for name, _ in bound], recorder, runtime, owns)


def _runtime_hook(runtime, layer, recorder):
    apply = _native.lib.phatgoose_runtime_apply
    name, in_width, out_width = layer.name, layer.in_width, layer.out_width
    slots = layer.slots

    def hook(module, arguments, output):
        x = _checked_input(name, arguments[0], output, in_width)
        tokens = x.numel() // in_width
        if not output.is_contiguous():
            delta = torch.zeros(output.shape, dtype=torch.float32)
            hook(module, (x,), delta)
            output.add_(delta)
            return output
        experts = weights = None
        count = 0
        if recorder is not None and recorder.enabled:
            experts = np.full((tokens, slots), -1, dtype=np.int32)
            weights = np.zeros((tokens, slots), dtype=np.float32)
            count = experts.size
        # The runtime reads x and adds the delta into the layer's output where they lie (zero copy).
        status = apply(runtime._handle.live(), layer._handle.live(), x.data_ptr(), tokens, tokens * in_width,
                       output.data_ptr(), tokens * out_width, None if experts is None else experts.ctypes.data,
                       None if weights is None else weights.ctypes.data, count)
        if status != _native.OK:
            raise error_for(status)
        if experts is not None:
            batch = tuple(x.shape[:-1])
            recorder.records.append(Route(name, experts.reshape(*batch, slots), weights.reshape(*batch, slots)))
        return output
    return hook


# ---------------------------------------------------------------------------------------------------------------------
# The pure-PyTorch reference


def _layer_norm(z):
    """LN over the last axis: (z - mean) / sqrt(biased variance + 1e-5), no affine."""
    mean = z.mean(-1, keepdim=True)
    centred = z - mean
    return centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + 1e-5)


class ReferenceModule:
    """One module's experts for the reference: candidates (expert indices, ascending), the normalised gate matrix
    LN(G) / sqrt(in) [n, in], Arrow prototypes [n, in], and per candidate lora_A [r, in], lora_B [out, r], scale."""

    def __init__(self, name, candidates, gates, a, b, scales):
        self.name = name
        self.candidates = candidates
        self.in_width = a[0].shape[1]
        self.out_width = b[0].shape[0]
        self.gates = _layer_norm(gates) / math.sqrt(self.in_width) if gates is not None else None
        self.a, self.b, self.scales = a, b, scales
        self._prototypes = None

    @property
    def prototypes(self):
        """Arrow: the top right-singular vector of each candidate's B A, [n, in] (float64 SVD, sign irrelevant)."""
        if self._prototypes is None:
            self._prototypes = torch.stack([torch.linalg.svd((b.double() @ a.double()), full_matrices=False)[2][0]
                                            for a, b in zip(self.a, self.b)]).float()
        return self._prototypes


ReferenceLibrary = collections.namedtuple("ReferenceLibrary", ["experts", "modules", "routing"])
ReferenceLibrary.__doc__ = ("A library as the reference reads it: expert names by index, {module: ReferenceModule}, "
                            "and library.json's routing defaults.")


def read_library(path):
    """A ReferenceLibrary from a library directory (DESIGN.md §2), read with this package's own Python readers (the
    gate tools' adapter reader and phatgoose.safetensors): the reference shares no code with the runtime."""
    from . import _gate_tools, safetensors
    path = os.fspath(path)
    manifest_path = os.path.join(path, "library.json")
    routing = {}
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        entries = [(e["name"], os.path.join(path, e["path"])) for e in manifest["experts"]]
        routing = manifest.get("routing", {})
    elif os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if os.path.exists(os.path.join(path, n, "adapter_config.json"))),
                       key=os.fsencode)
        entries = [(n, os.path.join(path, n)) for n in names]
    else:
        raise invalid(f"{path}: expected a library directory (the reference does not read packed libraries)")
    per_module = {}
    for index, (name, directory) in enumerate(entries):
        try:
            adapter = _gate_tools.read_adapter(directory)
        except _gate_tools.InputError as error:
            raise invalid(str(error)) from None
        gates_path = os.path.join(directory, "gates.safetensors")
        gates = safetensors.load(gates_path) if os.path.exists(gates_path) else {}
        for module, lora in adapter.modules.items():
            gate = gates.get(module)
            per_module.setdefault(module, []).append((index, gate, lora))
    modules = {}
    for module, entries_here in per_module.items():
        have_gates = all(gate is not None for _, gate, _ in entries_here)
        modules[module] = ReferenceModule(
            module, [i for i, _, _ in entries_here],
            torch.from_numpy(np.stack([np.asarray(g, dtype=np.float32) for _, g, _ in entries_here])) if have_gates else None,
            [torch.from_numpy(lora.a) for _, _, lora in entries_here],
            [torch.from_numpy(lora.b) for _, _, lora in entries_here],
            [lora.scale for _, _, lora in entries_here])
    return ReferenceLibrary([name for name, _ in entries], modules, routing)


def reference_route(module, x, *, top_k, router, arrow_temperature=10.0, arrow_scaled=False):
    """(candidate positions [T, k] int64, weights [T, k] float32) for the rows of x [T, in], DESIGN.md §1."""
    n = len(module.candidates)
    if router == "uniform":
        chosen = torch.arange(n).expand(x.shape[0], n)
        return chosen, torch.full((x.shape[0], n), 1.0 / n)
    if router == "arrow":
        scores = (x @ module.prototypes.T).abs() / arrow_temperature
        if arrow_scaled:
            scores = scores / math.sqrt(module.in_width)
    else:
        if module.gates is None:
            raise invalid(f"module '{module.name}': expected a gate for every expert (gates.safetensors), found none")
        scores = _layer_norm(x) @ module.gates.T
    p = torch.softmax(scores, dim=-1)
    k = min(top_k, n)
    # A stable descending sort keeps equal probabilities in index order: on ties the lower expert index wins.
    top, chosen = torch.sort(p, dim=-1, descending=True, stable=True)
    top, chosen = top[:, :k], chosen[:, :k]
    return chosen, top / (top.sum(-1, keepdim=True) + 1e-6)


def reference_delta(module, x, chosen, weights, dense=False):
    """The mixture delta [T, out] for rows x [T, in]: per chosen expert, its tokens' w * scale * B (A x).
    `dense` runs every expert on every token with a zero weight where it was not chosen (the same sum, written as
    two GEMMs over the stacked experts; faster in PyTorch for a few small experts)."""
    tokens = x.shape[0]
    if dense:
        if not hasattr(module, "_stacked"):
            module._stacked = (torch.cat(module.a), torch.cat([b * s for b, s in zip(module.b, module.scales)], dim=1),
                               torch.tensor([a.shape[0] for a in module.a]))
        a_all, b_all, ranks = module._stacked
        mixture = torch.zeros(tokens, len(module.candidates))
        mixture.scatter_add_(1, chosen, weights)
        return ((x @ a_all.T) * torch.repeat_interleave(mixture, ranks, dim=1)) @ b_all.T
    delta = torch.zeros(tokens, module.out_width)
    for position in range(len(module.candidates)):
        rows, slots = (chosen == position).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        inner = (x[rows] @ module.a[position].T) * (weights[rows, slots] * module.scales[position]).unsqueeze(-1)
        delta.index_add_(0, rows, inner @ module.b[position].T)
    return delta


def attach_reference(model, library, *, top_k=None, router=None, record=False, arrow_temperature=10.0,
                     arrow_scaled=False, dense=False):
    """`attach`'s twin in plain PyTorch (DESIGN.md §1): the same hooks on the same modules, the same errors, the
    delta computed by `reference_route` and `reference_delta` from the library directory's own files. Routers
    "phatgoose" (default: the library's), "arrow" and "uniform"; `dense` as in `reference_delta`. `library` is a
    library directory or a ReferenceLibrary already read (read_library), to attach again without re-reading."""
    experts, modules, routing = library if isinstance(library, ReferenceLibrary) else read_library(library)
    router = router or routing.get("router", "phatgoose")
    top_k = top_k or routing.get("top_k", 2)
    if router not in ("phatgoose", "arrow", "uniform"):
        raise invalid(f"router: expected one of phatgoose, arrow, uniform, found {router!r}")
    bound = _bind(model, {name: (m.in_width, m.out_width) for name, m in modules.items()})
    recorder = Recorder(experts) if record else None

    def hook_for(name):
        module = modules[name]
        candidates = torch.tensor(module.candidates, dtype=torch.int32)

        def hook(_, arguments, output):
            x = _checked_input(name, arguments[0], output, module.in_width)
            rows = x.reshape(-1, module.in_width)
            chosen, weights = reference_route(module, rows, top_k=top_k, router=router,
                                              arrow_temperature=arrow_temperature, arrow_scaled=arrow_scaled)
            output += reference_delta(module, rows, chosen, weights, dense).reshape(output.shape)
            if recorder is not None and recorder.enabled:
                batch = tuple(x.shape[:-1])
                recorder.records.append(Route(name, candidates[chosen].numpy().reshape(*batch, -1),
                                              weights.numpy().astype(np.float32).reshape(*batch, -1)))
            return output
        return hook

    hooks = [layer.register_forward_hook(hook_for(name)) for name, layer in bound]
    return Handle(hooks, [name for name, _ in bound], recorder)


__all__ = ["attach", "attach_reference", "Handle", "Recorder", "Route", "DEFAULT_WORKERS", "ReferenceLibrary",
           "read_library", "reference_route", "reference_delta"]

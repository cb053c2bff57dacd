"""`phatgoose.torch.attach` on a tiny randomly initialised Llama made here, against the pure-PyTorch reference
(`attach_reference`, DESIGN.md §1): logits within 1e-4 of the reference's (relative to their norm) for every router,
identical greedy generations, the recorder's routing, `detach` restoring the base model's logits exactly, and the
errors for modules and tensors it cannot serve."""

import json

import numpy as np
import pytest
from conftest import torch, transformers

import phatgoose
import phatgoose.torch as pgt
from phatgoose import safetensors

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 32, 48, 2, 64
PROJECTIONS = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (32, 16), "self_attn.v_proj": (32, 16),
               "self_attn.o_proj": (32, 32), "mlp.gate_proj": (32, 48), "mlp.up_proj": (32, 48),
               "mlp.down_proj": (48, 32)}
EXPERTS = ["alpha", "beta", "gamma", "delta"]
TOLERANCE = 1e-4


def tiny_llama(hidden=HIDDEN, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=INTERMEDIATE,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def module_names():
    return [f"model.layers.{layer}.{projection}" for layer in range(LAYERS) for projection in PROJECTIONS]


def write_library(directory, seed=0, skip=()):
    """Four experts with random LoRA (rank 4, lora_alpha 8, so scale 2) and random gates on every projection; the
    last expert adapts only the attention projections, so it is no candidate at the MLP ones. `skip` names modules
    no expert adapts. Returns the directory."""
    rng = np.random.default_rng(seed)
    entries = []
    for index, name in enumerate(EXPERTS):
        expert = directory / name
        expert.mkdir(parents=True)
        weights, gates = {}, {}
        for module in module_names():
            if module in skip or (index == len(EXPERTS) - 1 and ".mlp." in module):
                continue
            in_width, out_width = PROJECTIONS[module.split(".", 3)[3]]
            weights[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((4, in_width), dtype=np.float32) * 0.3
            weights[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((out_width, 4), dtype=np.float32) * 0.3
            gates[module] = rng.standard_normal(in_width, dtype=np.float32)
        safetensors.save(expert / "adapter_model.safetensors", weights)
        safetensors.save(expert / "gates.safetensors", gates)
        (expert / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(PROJECTIONS), "bias": "none"}))
        entries.append({"name": name, "path": name})
    (directory / "library.json").write_text(json.dumps({"format": "phatgoose-library", "version": 1, "experts": entries,
                                                        "routing": {"router": "phatgoose", "top_k": 2}}))
    return directory


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return write_library(tmp_path_factory.mktemp("tiny-library"))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.clone()


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("router,top_k", [("phatgoose", 2), ("phatgoose", 1), ("phatgoose", 3), ("uniform", None),
                                          ("arrow", 2)])
def test_logits_match_the_reference(model, library, ids, router, top_k):
    base = logits(model, ids)
    with pgt.attach(model, library, router=router, top_k=top_k):
        ours = logits(model, ids)
    with pgt.attach_reference(model, library, router=router, top_k=top_k):
        reference = logits(model, ids)
    assert relative(ours, reference) < TOLERANCE
    # The experts matter: without the delta the logits would be far from the reference's.
    assert relative(base, reference) > 100 * TOLERANCE


def test_dense_reference_is_the_same_sum(model, library, ids):
    with pgt.attach_reference(model, library):
        loop = logits(model, ids)
    with pgt.attach_reference(model, library, dense=True):
        dense = logits(model, ids)
    assert relative(dense, loop) < TOLERANCE


def test_greedy_generations_are_identical(model, library, ids):
    def generate():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, pad_token_id=0)
    base = generate()
    with pgt.attach(model, library):
        ours = generate()
    with pgt.attach_reference(model, library):
        reference = generate()
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, base)


def test_detach_restores_the_base_model_exactly(model, library, ids):
    base = logits(model, ids)
    handle = pgt.attach(model, library)
    assert handle.attached and len(handle.modules) == len(module_names())
    attached = logits(model, ids)
    handle.detach()
    handle.detach()  # idempotent
    assert not handle.attached and handle.runtime.closed
    assert torch.equal(logits(model, ids), base)
    assert not torch.equal(attached, base)
    with pgt.attach_reference(model, library):
        pass
    assert torch.equal(logits(model, ids), base)


def test_no_grad_and_inference_mode_give_the_same_logits(model, library, ids):
    with pgt.attach(model, library):
        with torch.no_grad():
            under_no_grad = model(input_ids=ids).logits
        with torch.inference_mode():
            under_inference = model(input_ids=ids).logits
    assert torch.equal(under_no_grad, under_inference)


def test_recorder_holds_each_calls_routing(model, library, ids):
    with pgt.attach(model, library, record=True) as ours:
        logits(model, ids)
    with pgt.attach_reference(model, library, record=True) as theirs:
        logits(model, ids)
    assert [r.module for r in ours.recorder.records] == [r.module for r in theirs.recorder.records] == module_names()
    for mine, reference in zip(ours.recorder.records, theirs.recorder.records):
        assert mine.experts.shape == (3, 9, 2) and mine.weights.shape == (3, 9, 2)
        assert np.array_equal(mine.experts, reference.experts), mine.module
        np.testing.assert_allclose(mine.weights, reference.weights, atol=1e-5)
        # Each token's weights are its renormalised top-2 probabilities.
        np.testing.assert_allclose(mine.weights.sum(-1), 1.0, atol=1e-5)
    mlp = [r for r in ours.recorder.records if ".mlp." in r.module]
    assert all((r.experts != EXPERTS.index("delta")).all() for r in mlp)  # delta adapts no MLP projection
    shares = ours.recorder.shares()
    assert set(shares) == set(EXPERTS) and abs(sum(shares.values()) - 1) < 1e-9


def test_recorder_sees_decode_steps(model, library, ids):
    with pgt.attach(model, library, record=True) as handle:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
    calls = handle.recorder.by_module()[module_names()[0]]
    assert [r.experts.shape[:2] for r in calls] == [(3, 9), (3, 1), (3, 1)]  # prefill, then one token per step


def test_shared_runtime(model, library, ids):
    with phatgoose.Runtime(library, workers=0) as runtime:
        with pgt.attach_reference(model, library):
            reference = logits(model, ids)
        with pgt.attach(model, runtime) as handle:
            ours = logits(model, ids)
        assert not runtime.closed  # the caller's runtime stays open
        assert relative(ours, reference) < TOLERANCE
        with pytest.raises(phatgoose.InvalidArgumentError, match="carries its own options"):
            pgt.attach(model, runtime, top_k=1)


# Errors


@pytest.mark.parametrize("attach", [pgt.attach, pgt.attach_reference])
def test_widths_that_disagree_name_the_module(library, attach):
    wider = tiny_llama(hidden=40)
    with pytest.raises(phatgoose.ShapeError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*32 -> 32.*40 -> 40"):
        attach(wider, library)
    assert not any(module._forward_hooks for module in wider.modules())  # nothing left attached


@pytest.mark.parametrize("attach", [pgt.attach, pgt.attach_reference])
def test_a_module_the_model_lacks_is_named(library, attach):
    shallow = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(phatgoose.InvalidArgumentError, match=r"module 'model\.layers\.1\..*found none"):
        attach(shallow, library)


@pytest.mark.parametrize("attach", [pgt.attach, pgt.attach_reference])
def test_float64_is_refused_naming_the_module(library, ids, attach):
    model = tiny_llama().double()
    with attach(model, library):
        with pytest.raises(phatgoose.InvalidArgumentError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*float32.*torch\.float64"):
            logits(model, ids)


@pytest.mark.parametrize("attach", [pgt.attach, pgt.attach_reference])
def test_tensors_that_require_grad_are_refused(model, library, ids, attach):
    with attach(model, library):
        with pytest.raises(phatgoose.InvalidArgumentError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*requires grad"):
            model(input_ids=ids)


@pytest.mark.parametrize("attach", [pgt.attach, pgt.attach_reference])
def test_tensors_off_the_cpu_are_refused(library, attach):
    # The meta device stands in for an accelerator: same checks, no hardware needed. A model of bare Linear layers
    # named like the library's modules, all on it.
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList()
    for _ in range(LAYERS):
        block = torch.nn.Module()
        block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
        for projection, (in_width, out_width) in PROJECTIONS.items():
            part, leaf = projection.split(".")
            setattr(getattr(block, part), leaf, torch.nn.Linear(in_width, out_width, bias=False, device="meta"))
        model.model.layers.append(block)
    layer = model.model.layers[0].self_attn.q_proj
    with attach(model, library):
        with torch.inference_mode(), pytest.raises(phatgoose.InvalidArgumentError,
                                                   match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*CPU.*meta"):
            layer(torch.zeros(2, HIDDEN, device="meta"))


def test_a_module_that_is_not_linear_is_named(library):
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj = torch.nn.Identity()
    with pytest.raises(phatgoose.InvalidArgumentError, match=r"module 'model\.layers\.0\.mlp\.down_proj'.*Linear.*Identity"):
        pgt.attach(model, library)

"""`phatgoose.train_gates` on a tiny Llama: only the gates train, the loss falls, different experts get different
gates, a run is deterministic, and the two experts' library routes each task's held-out tokens to its own expert."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import (LLAMA_TARGETS, causal_encoding, copy_expert, digest, directory_digests, gated_peft_loss,
                      phatgoose_tool, torch, transformers)

from phatgoose import _gate_tools, safetensors
from phatgoose import train_gates as train_gates_module
from phatgoose.average_activation import average_activation
from phatgoose.train_gates import train_gates

STEPS = 100  # the recipe's


@pytest.fixture(scope="session")
def trained(llama, llama_experts, tmp_path_factory):
    """Each expert's gates, trained into a copy of its adapter directory."""
    results = {}
    for task, expert in llama_experts.items():
        directory = copy_expert(expert, tmp_path_factory.mktemp(f"gates-{task}") / "adapter")
        results[task] = train_gates(llama, directory, expert["data"], steps=STEPS, quiet=True)
    return results


def test_only_the_gates_change(llama, llama_experts, tmp_path, monkeypatch):
    expert = llama_experts["reverse"]
    adapter = copy_expert(expert, tmp_path / "adapter")
    inputs_before = {"adapter": directory_digests(adapter), "model": directory_digests(llama), "data": digest(expert["data"])}
    seen = {}
    load_model, bind_modules = _gate_tools.load_model, _gate_tools.bind_modules

    def recording_load(*args, **kwargs):
        network, tokenizer, seq2seq = load_model(*args, **kwargs)
        seen["network"] = network
        seen["before"] = {name: tensor.clone() for name, tensor in network.state_dict().items()}
        return network, tokenizer, seq2seq

    def recording_bind(*args, **kwargs):
        seen["bound"] = bind_modules(*args, **kwargs)
        return seen["bound"]

    monkeypatch.setattr(_gate_tools, "load_model", recording_load)
    monkeypatch.setattr(_gate_tools, "bind_modules", recording_bind)
    result = train_gates(llama, adapter, expert["data"], steps=10, out=tmp_path / "gates.safetensors", quiet=True)

    after = seen["network"].state_dict()
    assert after.keys() == seen["before"].keys()
    for name, tensor in seen["before"].items():
        assert torch.equal(after[name], tensor), f"base parameter {name} changed"
    assert all(not p.requires_grad and p.grad is None for p in seen["network"].parameters())
    # The LoRA the tool ran with is still exactly the adapter file's.
    stored = safetensors.load(adapter / "adapter_model.safetensors")
    for name, (_, lora) in seen["bound"].items():
        assert np.array_equal(lora.a, stored[f"base_model.model.{name}.lora_A.weight"]), f"{name}: lora_A changed"
        assert np.array_equal(lora.b, stored[f"base_model.model.{name}.lora_B.weight"]), f"{name}: lora_B changed"
    assert {"adapter": directory_digests(adapter), "model": directory_digests(llama),
            "data": digest(expert["data"])} == inputs_before
    # ... and the gates did train: every one moved from zero.
    assert all(np.abs(gate).max() > 0 for gate in result.gates.values())


def test_gates_file_layout(llama_experts, trained):
    result = trained["reverse"]
    stored = safetensors.load(result.path)
    adapter = safetensors.load(llama_experts["reverse"]["adapter"] / "adapter_model.safetensors")
    modules = {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for key in adapter if "lora_A" in key}
    assert set(stored) == modules and len(modules) == 2 * len(LLAMA_TARGETS)
    for name, gate in stored.items():
        assert gate.dtype == np.float32 and gate.shape == (adapter[f"base_model.model.{name}.lora_A.weight"].shape[1],)
        assert np.array_equal(gate, result.gates[name])


def test_loss_on_the_experts_data_falls(llama, llama_experts, trained):
    for task, expert in llama_experts.items():
        assert len(trained[task].losses) == STEPS and all(np.isfinite(trained[task].losses))
        # Measured independently (PEFT with the official input gating) over whole data sets, as one batch's loss
        # is too noisy to compare steps: the gates start at zero, i.e. the LoRA at half strength.
        for records in (expert["train_records"], expert["held_out_records"]):
            untrained = gated_peft_loss(llama, expert["adapter"], records, None, seq2seq=False)
            gated = gated_peft_loss(llama, expert["adapter"], records, trained[task].gates, seq2seq=False)
            assert gated < untrained - 0.005, f"{task}: loss {untrained:.4f} with zero gates, {gated:.4f} trained"


def test_different_experts_get_different_gates(trained):
    reverse, sort = trained["reverse"].gates, trained["sort"].gates
    assert reverse.keys() == sort.keys()
    cosines = [float(np.dot(reverse[m], sort[m]) / (np.linalg.norm(reverse[m]) * np.linalg.norm(sort[m]))) for m in reverse]
    assert np.mean(cosines) < 0.5, f"the two experts' gates are alike: cosines {np.round(cosines, 3)}"


def test_same_seed_same_bytes(llama, llama_experts, tmp_path):
    expert = llama_experts["sort"]
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.safetensors"
        train_gates(llama, expert["adapter"], expert["data"], steps=8, batch_size=4, seed=seed, out=out, quiet=True)
        runs.append(out.read_bytes())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2], "the seed does not change the batches"


def test_warmup_and_clipping_follow_the_recipe(llama, llama_experts, tmp_path, monkeypatch):
    """lr 0 at the first step, linear warm-up over int(6% of the steps), then constant; the gradient norm clipped
    at MAX_GRAD_NORM, which is 1 (made 1e-3 here, as these gradients are smaller than 1)."""
    expert = llama_experts["reverse"]
    rates, norms = [], []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    assert train_gates_module.MAX_GRAD_NORM == 1.0
    monkeypatch.setattr(train_gates_module, "MAX_GRAD_NORM", 1e-3)
    train_gates(llama, expert["adapter"], expert["data"], steps=50, batch_size=2, lr=1e-2,
                out=tmp_path / "g.safetensors", quiet=True)
    warmup = int(50 * 0.06)  # 3
    assert rates[:warmup + 1] == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3, 1e-2])
    assert rates[warmup:] == pytest.approx([1e-2] * (50 - warmup))
    assert max(norms) <= 1e-3 * (1 + 1e-4)


def module_inputs(model_dir, records):
    """{module: [tokens, in]} inputs of every adapted module over the real tokens of `records` (the base model, one
    example at a time, so no padding), and for each token the index of the record it came from."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    captured, owners = {}, []
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: captured.setdefault(name, []).append(args[0][0]))
               for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    with torch.no_grad():
        for index, record in enumerate(records):
            ids, _ = causal_encoding(tokenizer, record)
            model(input_ids=torch.tensor([ids]))
            owners += [index] * len(ids)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(rows).numpy() for name, rows in captured.items()}, np.array(owners)


def layer_norm(z):
    z = np.asarray(z, dtype=np.float64)
    centred = z - z.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5)


def top1(x, gates):
    """DESIGN.md section 1: s_i = LN(x) . LN(g_i) / sqrt(d_in), softmax, top-1 (ties: the lower index)."""
    scores = layer_norm(x) @ layer_norm(np.stack(gates)).T / np.sqrt(x.shape[1])
    p = np.exp(scores - scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.argmax(p, axis=1)


def routing_shares(llama, llama_experts, gates_by_task):
    """For each task, over its held-out examples: the share of (token, module) top-1 choices that pick its own
    expert, and the share of examples whose choices pick its own expert more often than not."""
    tasks = list(llama_experts)
    shares = {}
    for index, task in enumerate(tasks):
        inputs, owners = module_inputs(llama, llama_experts[task]["held_out_records"])
        own = np.stack([top1(x, [gates_by_task[t][name] for t in tasks]) == index for name, x in inputs.items()])
        per_example = [own[:, owners == example].mean() for example in range(owners.max() + 1)]
        shares[task] = (float(own.mean()), float(np.mean(np.array(per_example) > 0.5)))
    return shares


def assert_routes_to_own_expert(shares):
    for task, (tokens, examples) in shares.items():
        # chance is 50% for both
        assert tokens > 0.6, f"held-out {task} tokens go to their own expert {tokens:.0%} of the time"
        assert examples >= 0.75, f"held-out {task} examples go mostly to their own expert {examples:.0%} of the time"


def write_library(directory, llama_experts, gate_files):
    """A library directory (DESIGN.md section 2) with both experts, their adapters and gates, and library.json."""
    directory.mkdir()
    for task, expert in llama_experts.items():
        shutil.copytree(expert["adapter"], directory / task)
        shutil.copy(gate_files[task], directory / task / "gates.safetensors")
    manifest = {"format": "phatgoose-library", "version": 1,
                "experts": [{"name": task, "path": task} for task in llama_experts],
                "routing": {"router": "phatgoose", "top_k": 1}}
    (directory / "library.json").write_text(json.dumps(manifest, indent=2))
    return directory


def test_library_routes_each_task_to_its_expert(llama, llama_experts, trained, tmp_path):
    library = write_library(tmp_path / "library", llama_experts, {task: r.path for task, r in trained.items()})
    gates = {task: safetensors.load(library / task / "gates.safetensors") for task in llama_experts}
    assert_routes_to_own_expert(routing_shares(llama, llama_experts, gates))


def test_phatgoose_apply_routes_as_the_reference(llama, llama_experts, trained, tmp_path):
    """The runtime (`phatgoose apply --top-k 1`) on the library makes the top-1 choices computed above."""
    tool = phatgoose_tool()
    if tool is None:
        pytest.skip("the phatgoose tool is not built (swift build -c release) and PHATGOOSE_BIN is not set")
    library = write_library(tmp_path / "library", llama_experts, {task: r.path for task, r in trained.items()})
    inspected = subprocess.run([tool, "inspect", library], capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stderr
    tasks = list(llama_experts)
    inputs, _ = module_inputs(llama, llama_experts["sort"]["held_out_records"] + llama_experts["reverse"]["held_out_records"])
    safetensors.save(tmp_path / "x.safetensors", inputs)
    applied = subprocess.run([tool, "apply", "--library", library, "--input", tmp_path / "x.safetensors",
                              "--output", tmp_path / "y.safetensors", "--top-k", "1"], capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    output = safetensors.load(tmp_path / "y.safetensors")
    gates = {task: trained[task].gates for task in tasks}
    for name, x in inputs.items():
        expected = top1(x, [gates[task][name] for task in tasks])
        # float32 in the runtime, float64 here: a near tie may go either way
        assert np.mean(output[f"{name}.experts"][:, 0] == expected) >= 0.99, name


def test_average_activation_library_routes_each_task_to_its_expert(llama, llama_experts, tmp_path):
    gates = {task: average_activation(llama, expert["adapter"], expert["data"], examples=32,
                                      out=tmp_path / f"{task}.safetensors", quiet=True)
             for task, expert in llama_experts.items()}
    assert_routes_to_own_expert(routing_shares(llama, llama_experts, gates))

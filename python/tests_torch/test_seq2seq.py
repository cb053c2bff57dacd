"""`phatgoose.train_gates` on a tiny T5 (encoder-decoder): the gates of every encoder, decoder and cross-attention
module train, the loss on the expert's data falls, and a run is deterministic."""

import numpy as np
import pytest
from conftest import digest, gated_peft_loss

from phatgoose import safetensors
from phatgoose.train_gates import train_gates


@pytest.fixture(scope="session")
def t5_trained(t5, t5_experts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5-gates")
    return {task: train_gates(t5, expert["adapter"], expert["data"], out=directory / f"{task}.safetensors", quiet=True)
            for task, expert in t5_experts.items()}


def test_every_module_gets_a_gate(t5_experts, t5_trained):
    adapter = safetensors.load(t5_experts["sort"]["adapter"] / "adapter_model.safetensors")
    modules = {key[len("base_model.model."):-len(".lora_A.weight")] for key in adapter if key.endswith("lora_A.weight")}
    gates = safetensors.load(t5_trained["sort"].path)
    assert set(gates) == modules
    assert {"encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.k",
            "decoder.block.1.layer.2.DenseReluDense.wo"} <= modules
    assert all(np.abs(gate).max() > 0 for gate in gates.values())


def test_loss_on_the_experts_data_falls(t5, t5_experts, t5_trained):
    for task, expert in t5_experts.items():
        records = expert["train_records"]
        untrained = gated_peft_loss(t5, expert["adapter"], records, None, seq2seq=True)
        gated = gated_peft_loss(t5, expert["adapter"], records, t5_trained[task].gates, seq2seq=True)
        assert gated < untrained - 0.005, f"{task}: loss {untrained:.4f} with zero gates, {gated:.4f} trained"


def test_same_seed_same_bytes(t5, t5_experts, tmp_path):
    expert = t5_experts["reverse"]
    outputs = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for out in outputs:
        train_gates(t5, expert["adapter"], expert["data"], steps=6, batch_size=4, seed=9, out=out, quiet=True)
    assert digest(outputs[0]) == digest(outputs[1])

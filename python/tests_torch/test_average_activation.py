"""`phatgoose.average_activation` equals an independent reference: PEFT applies the expert's LoRA, each example runs
alone (no padding), and a module's gate is the mean over examples of the plain mean of its input over the sequence.
The tool batches padded sequences, so this checks its masks too: a causal LM's, and a T5's encoder, decoder and
cross-attention (whose keys and values read the encoder's tokens)."""

import numpy as np
import pytest
from conftest import causal_encoding, peft, torch, transformers, write_jsonl

from phatgoose import safetensors
from phatgoose.average_activation import average_activation


def reference(model_dir, adapter, records, seq2seq):
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    base = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    means = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            plain = name.removeprefix("base_model.model.")
            module.register_forward_pre_hook(
                lambda m, args, plain=plain: means.setdefault(plain, []).append(args[0][0].double().mean(0)))
    with torch.no_grad():
        for record in records:
            if seq2seq:
                ids = tokenizer(record["input"])["input_ids"]
                labels = tokenizer(record["target"])["input_ids"]
                decoder = [base.config.decoder_start_token_id] + labels[:-1]  # teacher forcing
                model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder]))
            else:
                ids, _ = causal_encoding(tokenizer, record)
                model(input_ids=torch.tensor([ids]))
    return {name: torch.stack(rows).mean(0).numpy() for name, rows in means.items()}


def assert_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == np.float32
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_causal_lm_equals_the_reference(llama, llama_experts, tmp_path):
    expert = llama_experts["reverse"]
    records = expert["train_records"][:20]  # 11 to 19 tokens each: padding in every batch
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / "gates.safetensors"
    gates = average_activation(llama, expert["adapter"], data, examples=100, batch_size=6, out=out, quiet=True)
    assert_close(gates, reference(llama, expert["adapter"], records, seq2seq=False))
    assert_close(safetensors.load(out), gates)


def test_examples_are_a_seeded_sample(llama, llama_experts, tmp_path):
    expert = llama_experts["sort"]
    records = expert["train_records"][:20]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    chosen = [records[i] for i in np.random.default_rng(5).permutation(len(records))[:7]]
    gates = average_activation(llama, expert["adapter"], data, examples=7, seed=5, out=tmp_path / "g.safetensors",
                               quiet=True)
    assert_close(gates, reference(llama, expert["adapter"], chosen, seq2seq=False))


def test_seq2seq_equals_the_reference(t5, t5_experts, tmp_path):
    expert = t5_experts["sort"]
    records = expert["train_records"][:20]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    gates = average_activation(t5, expert["adapter"], data, batch_size=6, out=tmp_path / "g.safetensors", quiet=True)
    expected = reference(t5, expert["adapter"], records, seq2seq=True)
    assert any("EncDecAttention.k" in name for name in expected) and any(name.startswith("encoder.") for name in expected)
    assert_close(gates, expected)


@pytest.mark.parametrize("model", ["llama", "t5"])
def test_same_inputs_same_bytes(request, model, tmp_path):
    model_dir = request.getfixturevalue(model)
    expert = request.getfixturevalue(f"{model}_experts")["reverse"]
    outputs = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for out in outputs:
        average_activation(model_dir, expert["adapter"], expert["data"], examples=16, batch_size=5, out=out, quiet=True)
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def test_seq2seq_encoder_and_decoder_of_equal_length(t5, t5_experts, tmp_path):
    """Batches whose encoder and decoder sides have the same padded length but different real lengths per row."""
    expert = t5_experts["sort"]
    records = [{"input": "fedcba", "target": "ab"}, {"input": "ba", "target": "abcdef"},
               {"input": "cba", "target": "abcd"}, {"input": "edcba", "target": "a"}]  # both sides 7 tokens padded
    data = write_jsonl(tmp_path / "data.jsonl", records)
    gates = average_activation(t5, expert["adapter"], data, batch_size=4, out=tmp_path / "g.safetensors", quiet=True)
    assert_close(gates, reference(t5, expert["adapter"], records, seq2seq=True))

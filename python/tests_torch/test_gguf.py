"""A model loaded from a GGUF file (`--gguf-file`, through transformers and the `gguf` package): the tiny Llama is
written as GGUF here (F32 tensors, llama.cpp's names and its q/k row order) into a directory that holds only the
tokenizer and that file, and the tools give the same gates as from the original directory."""

import shutil

import numpy as np
import pytest
from conftest import run_module, torch, transformers

from phatgoose.average_activation import average_activation
from phatgoose.train_gates import train_gates

gguf = pytest.importorskip("gguf")


def llama_cpp_order(weight, heads):
    """llama.cpp's conversion interleaves the two rotary halves of each q/k head; transformers undoes it on load."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model_dir, path):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy()
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_order(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_order(weight, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def llama_gguf(llama, tmp_path_factory):
    """(directory, file name): the tokenizer files and tiny.gguf, no config.json or safetensors weights."""
    directory = tmp_path_factory.mktemp("llama-gguf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, directory / name)
    write_llama_gguf(llama, directory / "tiny.gguf")
    return directory, "tiny.gguf"


def test_gguf_model_is_the_same_model(llama, llama_gguf):
    directory, name = llama_gguf
    original = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 13, 40, 2]])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, loaded(ids).logits)


def test_train_gates_from_gguf(llama, llama_gguf, llama_experts, tmp_path):
    directory, name = llama_gguf
    expert = llama_experts["reverse"]
    from_gguf = train_gates(directory, expert["adapter"], expert["data"], gguf_file=name, steps=10,
                            out=tmp_path / "gguf.safetensors", quiet=True)
    from_directory = train_gates(llama, expert["adapter"], expert["data"], steps=10,
                                 out=tmp_path / "dir.safetensors", quiet=True)
    assert (tmp_path / "gguf.safetensors").read_bytes() == (tmp_path / "dir.safetensors").read_bytes()
    assert all(np.abs(gate).max() > 0 for gate in from_gguf.gates.values())
    assert from_gguf.losses == from_directory.losses


def test_average_activation_from_gguf_on_the_command_line(llama, llama_gguf, llama_experts, tmp_path):
    directory, name = llama_gguf
    expert = llama_experts["sort"]
    out = tmp_path / "gguf.safetensors"
    result = run_module("average_activation", "--model", directory, "--gguf-file", name, "--adapter",
                        expert["adapter"], "--data", expert["data"], "--examples", 12, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    average_activation(llama, expert["adapter"], expert["data"], examples=12, out=tmp_path / "dir.safetensors",
                       quiet=True)
    assert out.read_bytes() == (tmp_path / "dir.safetensors").read_bytes()


def test_output_over_the_gguf_file_is_refused(llama_gguf, llama_experts):
    directory, name = llama_gguf
    expert = llama_experts["sort"]
    before = (directory / name).read_bytes()
    result = run_module("train_gates", "--model", directory, "--gguf-file", name, "--adapter", expert["adapter"],
                        "--data", expert["data"], "--out", directory / name, "--quiet")
    assert result.returncode == 1 and "tiny.gguf" in result.stderr and "input" in result.stderr
    assert (directory / name).read_bytes() == before

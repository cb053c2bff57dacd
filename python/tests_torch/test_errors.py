"""Bad inputs: exit 1 with one line naming the file or module, usage errors exit 2, nothing written; an interrupted
or failed write leaves no file behind; the tools start without libphatgoose and report a missing PyTorch."""

import json
import os
import select
import signal
import sys
import time

import numpy as np
import pytest
from conftest import copy_expert, run_module, write_jsonl

from phatgoose import _gate_tools, average_activation, safetensors, train_gates

TOOLS = {"train_gates": train_gates.main, "average_activation": average_activation.main}


def run_main(capsys, tool, *arguments):
    """A tool's main() in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = TOOLS[tool]([*map(str, arguments), "--quiet"])
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


@pytest.fixture
def case(llama, llama_experts, tmp_path):
    """A working set of inputs in tmp_path: a copy of an expert, its data, and the model."""
    expert = llama_experts["reverse"]
    adapter = copy_expert(expert, tmp_path / "adapter")
    data = write_jsonl(tmp_path / "train.jsonl", expert["train_records"][:8])
    return {"model": llama, "adapter": adapter, "data": data, "tmp": tmp_path}


def arguments(case, tool="train_gates", **override):
    """The command line of `tool` on `case`, two steps or examples, with options replaced or added by `override`
    (`batch_size=1` is `--batch-size 1`)."""
    values = {"model": case["model"], "adapter": case["adapter"], "data": case["data"],
              **({"steps": 2} if tool == "train_gates" else {"examples": 2}), **override}
    argv = []
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return argv


def run_tool(capsys, tool, case, **override):
    return run_main(capsys, tool, *arguments(case, tool, **override))


def assert_input_error(result, *needles):
    code, stderr = result
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def leftovers(directory):
    return sorted(os.listdir(directory))


def rewrite_weights(adapter, change):
    path = adapter / "adapter_model.safetensors"
    tensors = safetensors.load(path)
    safetensors.save(path, change(tensors))


def rewrite_config(adapter, **fields):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("tool", TOOLS)
def test_works_and_writes_the_default_path(capsys, case, tool):
    """The baseline the error cases alter: it succeeds and writes EXPERT_DIR/gates.safetensors."""
    code, stderr = run_tool(capsys, tool, case)
    assert code == 0, stderr
    assert (case["adapter"] / "gates.safetensors").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_module_the_model_lacks(capsys, case, tool):
    def rename(tensors):
        return {key.replace("layers.1.mlp.down_proj", "layers.7.mlp.down_proj"): value for key, value in tensors.items()}
    rewrite_weights(case["adapter"], rename)
    assert_input_error(run_tool(capsys, tool, case), "adapter_model.safetensors", "model.layers.7.mlp.down_proj")
    assert not (case["adapter"] / "gates.safetensors").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_module_that_is_not_linear(capsys, case, tool):
    def rename(tensors):
        return {key.replace("layers.1.mlp.down_proj", "layers.1.mlp"): value for key, value in tensors.items()}
    rewrite_weights(case["adapter"], rename)
    assert_input_error(run_tool(capsys, tool, case), "model.layers.1.mlp'", "LlamaMLP")


@pytest.mark.parametrize("tool", TOOLS)
def test_widths_disagree(capsys, case, tool):
    """lora_A and lora_B 2 columns / rows short at one module: its widths are not the model's."""
    def shrink(tensors):
        key = "base_model.model.model.layers.0.self_attn.v_proj.lora_"
        tensors[key + "A.weight"] = tensors[key + "A.weight"][:, :30].copy()
        return tensors
    rewrite_weights(case["adapter"], shrink)
    assert_input_error(run_tool(capsys, tool, case), "adapter_model.safetensors", "model.layers.0.self_attn.v_proj",
                       "30 -> 16", "32 -> 16")


@pytest.mark.parametrize("fields, needles", [
    ({"use_dora": True}, ["adapter_config.json", "use_dora", "DoRA"]),
    ({"peft_type": "IA3"}, ["adapter_config.json", "peft_type", "IA3"]),
    ({"bias": "all"}, ["adapter_config.json", "bias", "all"]),
    ({"modules_to_save": ["lm_head"]}, ["adapter_config.json", "modules_to_save", "lm_head"]),
    ({"lora_bias": True}, ["adapter_config.json", "lora_bias", "true"]),
    ({"alora_invocation_tokens": [5, 6]}, ["adapter_config.json", "alora_invocation_tokens", "activated LoRA"]),
    ({"target_parameters": ["mlp.experts.down_proj"]}, ["adapter_config.json", "target_parameters"]),
    ({"use_qalora": True}, ["adapter_config.json", "use_qalora", "QA-LoRA"]),
    ({"r": 8}, ["adapter_model.safetensors", "rank 8", "found lora_A [4, "]),
    ({"rank_pattern": {"v_proj": 2}}, ["adapter_model.safetensors", "v_proj", "rank 2"]),
    ({"lora_alpha": "eight"}, ["adapter_config.json", "lora_alpha", "eight"]),
])
def test_config_that_is_not_plain_lora(capsys, case, fields, needles):
    rewrite_config(case["adapter"], **fields)
    assert_input_error(run_tool(capsys, "train_gates", case), *needles)


@pytest.mark.parametrize("key, needles", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", ["lora_magnitude_vector", "DoRA"]),
    ("base_model.model.model.embed_tokens.lora_embedding_A", ["lora_embedding_A", "embedding LoRA"]),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", ["lora_B.bias", "LoRA bias"]),
])
def test_tensor_that_plain_lora_lacks(capsys, case, key, needles):
    rewrite_weights(case["adapter"], lambda tensors: {**tensors, key: np.zeros(32, np.float32)})
    assert_input_error(run_tool(capsys, "train_gates", case), "adapter_model.safetensors", *needles)


def test_lora_a_without_lora_b(capsys, case):
    rewrite_weights(case["adapter"], lambda tensors: {k: v for k, v in tensors.items() if "q_proj.lora_B" not in k})
    assert_input_error(run_tool(capsys, "train_gates", case), "adapter_model.safetensors",
                       "model.layers.0.self_attn.q_proj", "lora_B")


def test_missing_adapter_files(capsys, case):
    os.remove(case["adapter"] / "adapter_config.json")
    assert_input_error(run_tool(capsys, "train_gates", case), "adapter_config.json")
    assert_input_error(run_tool(capsys, "train_gates", case, adapter=case["tmp"] / "nowhere"), "nowhere")


@pytest.mark.parametrize("tool", TOOLS)
def test_model_that_cannot_be_loaded(capsys, case, tool):
    missing = case["tmp"] / "no-model"
    assert_input_error(run_tool(capsys, tool, case, model=missing), str(missing), "cannot load the model")
    assert_input_error(run_tool(capsys, tool, case, gguf_file="missing.gguf"), "missing.gguf", "cannot load the model")
    assert not (case["adapter"] / "gates.safetensors").exists()


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("lines, needles", [
    (['{"input": "1>", "target": "1"}', '{"input": "2>", "target": "2"}', '{"input": "3>" "target"}'], ["line 3", "JSON"]),
    (['{"input": "1>", "target": "1"}', '{"input": "2>"}'], ["line 2", '"target"']),
    (['{"target": "1"}'], ["line 1", '"input"']),
    (['{"input": 1, "target": "1"}'], ["line 1", '"input"', "string"]),
    (['["1>", "1"]'], ["line 1", "JSON object"]),
    ([], ["no examples"]),
    (["", "   "], ["no examples"]),
])
def test_bad_data(capsys, case, tool, lines, needles):
    bad = case["tmp"] / "bad.jsonl"
    bad.write_text("\n".join(lines) + ("\n" if lines else ""))
    assert_input_error(run_tool(capsys, tool, case, data=bad), "bad.jsonl", *needles)


@pytest.mark.parametrize("tool", TOOLS)
def test_output_directory_missing(capsys, case, tool):
    out = case["tmp"] / "no" / "such" / "gates.safetensors"
    assert_input_error(run_tool(capsys, tool, case, out=out), str(out), "directory")


def test_output_is_a_directory(capsys, case):
    assert_input_error(run_tool(capsys, "train_gates", case, out=case["tmp"]), str(case["tmp"]), "directory")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("target", ["adapter_model.safetensors", "adapter_config.json", "data", "model config",
                                    "model weights", "symlink to data", "hard link to config"])
def test_output_would_overwrite_an_input(capsys, case, tool, target):
    adapter, tmp = case["adapter"], case["tmp"]
    before = {name: (adapter / name).read_bytes() for name in os.listdir(adapter)}
    if target == "data":
        out = case["data"]
    elif target == "model config":
        out = case["model"] / "config.json"
    elif target == "model weights":
        out = case["model"] / "model.safetensors"
    elif target == "symlink to data":
        out = tmp / "link.safetensors"
        out.symlink_to(case["data"])
    elif target == "hard link to config":
        out = tmp / "hard.safetensors"
        os.link(adapter / "adapter_config.json", out)
    else:
        out = adapter / target
    input_bytes = open(os.path.realpath(out), "rb").read()
    code, stderr = run_tool(capsys, tool, case, out=out)
    assert_input_error((code, stderr), str(out), "input")
    assert open(os.path.realpath(out), "rb").read() == input_bytes
    assert {name: (adapter / name).read_bytes() for name in os.listdir(adapter)} == before


@pytest.mark.parametrize("argv", [
    ["--steps", "0"], ["--lr", "0"], ["--lr", "nan"], ["--batch-size", "-1"], ["--max-length", "x"], ["--unknown"],
])
def test_usage_errors_exit_2(capsys, case, argv):
    code, stderr = run_main(capsys, "train_gates", *arguments(case), *argv)
    assert code == 2 and "usage:" in stderr


def test_required_options_exit_2(capsys, case):
    code, stderr = run_main(capsys, "average_activation", "--model", case["model"], "--data", case["data"])
    assert code == 2 and "--adapter" in stderr


def test_progress_without_tqdm(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm fails
    progress = _gate_tools.Progress(2, "gates", quiet=False)
    progress.update(loss=1.5)
    progress.update(loss=0.25)
    progress.close()
    assert capsys.readouterr().err == "\rgates: 1/2 loss=1.5000\rgates: 2/2 loss=0.2500\n"


def test_quiet_prints_nothing(capsys, case):
    code, stderr = run_tool(capsys, "train_gates", case)  # run_main adds --quiet
    assert code == 0 and stderr == ""


def test_failed_write_leaves_nothing(case, monkeypatch):
    """An exception (here KeyboardInterrupt, as SIGINT raises) between the temporary file and the rename: the
    temporary file is removed and the previous output is untouched."""
    out = case["tmp"] / "gates.safetensors"
    out.write_bytes(b"previous")

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(_gate_tools.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _gate_tools.write_gates(str(out), {"m": np.ones(4, np.float32)})
    assert out.read_bytes() == b"previous"
    assert leftovers(case["tmp"]) == sorted(["adapter", "train.jsonl", "gates.safetensors"])


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_leaves_nothing(case, signum, code):
    out_dir = case["tmp"] / "out"
    out_dir.mkdir()
    process = run_module("train_gates", *arguments(case, steps=100000, batch_size=1, out=out_dir / "gates.safetensors"),
                         background=True)
    seen = b""
    deadline = time.monotonic() + 120
    while b"gates:" not in seen and time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([process.stderr], [], [], 1)
        if ready:
            seen += os.read(process.stderr.fileno(), 4096)
    assert b"gates:" in seen, seen.decode(errors="replace")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert leftovers(out_dir) == []
    assert "nothing written" in stderr.decode()


def test_help_without_libphatgoose_or_torch(tmp_path):
    """--help needs neither libphatgoose nor PyTorch (sys.modules[...] = None makes their import fail)."""
    for tool in TOOLS:
        result = run_module_blocked(tool, "--help", env={"PHATGOOSE_LIBRARY": str(tmp_path / "missing.so")})
        assert result.returncode == 0, result.stderr
        assert "--adapter EXPERT_DIR" in result.stdout


def test_missing_torch_is_reported(case):
    result = run_module_blocked("train_gates", *arguments(case), "--quiet")
    assert result.returncode == 1
    assert "pip install 'phatgoose[train]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def run_module_blocked(tool, *argv, env=None):
    """Runs a tool with `import torch` failing."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['x'] + sys.argv[1:]; "
            f"runpy.run_module('phatgoose.{tool}', run_name='__main__')")
    return run_module(None, *argv, env=env, code=code)

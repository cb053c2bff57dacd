"""Fixtures for the gate tools' tests: tiny randomly initialised models made here (a Llama and a T5, each with a
character-level tokenizer; no download), small procedurally generated tasks, and PEFT LoRA experts trained on them.

These tests need the `train` extra (torch, transformers, peft, gguf); without it they are skipped. Everything runs on
one CPU thread with fixed seeds.
"""

import hashlib
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

torch.set_num_threads(1)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# The vocabulary: four special tokens, then one token per character.
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 >:"
VOCAB_SIZE = 64
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
T5_TARGETS = ["q", "k", "v", "wo"]  # k includes the decoder's EncDecAttention.k, whose input is the encoder's output


def make_tokenizer(append_eos):
    """A character-level tokenizer. Llama style (`append_eos` false): BOS before the text. T5 style: eos after it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    vocab = {token: i for i, token in enumerate(SPECIAL + list(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if append_eos:
        core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    else:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


# Tasks over disjoint characters, so that their experts' inputs differ.
def _reverse(rng):
    text = "".join(rng.choice("01234") for _ in range(rng.randint(4, 8)))
    return {"input": text + ">", "target": text[::-1]}


def _sort(rng):
    text = "".join(rng.choice("abcde") for _ in range(rng.randint(4, 8)))
    return {"input": text + ":", "target": "".join(sorted(text))}


TASKS = {"reverse": _reverse, "sort": _sort}


def task_examples(task, count, seed):
    rng = random.Random(f"{task}-{seed}")
    return [TASKS[task](rng) for _ in range(count)]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def digest(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def directory_digests(directory):
    """{file name: sha256} of every file in a directory tree."""
    directory = pathlib.Path(directory)
    return {str(p.relative_to(directory)): digest(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def causal_encoding(tokenizer, record):
    """ids and labels as the recipe defines them, written out independently of the tools."""
    prompt = tokenizer(record["input"])["input_ids"]
    answer = tokenizer(record["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """A tiny Llama (2 layers, width 32) and its tokenizer in one directory."""
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    make_tokenizer(append_eos=False).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def t5(tmp_path_factory):
    """A tiny T5 (2 + 2 blocks, width 32) and its tokenizer in one directory."""
    directory = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2,
                                   decoder_start_token_id=0, dropout_rate=0.1, initializer_factor=1.0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(directory)
    make_tokenizer(append_eos=True).save_pretrained(directory)
    return directory


def train_expert(model_dir, records, out_dir, targets, seq2seq, steps=60, lr=1e-2):
    """A PEFT LoRA expert (r 4, alpha 8) trained `steps` steps on `records`, saved in `out_dir`."""
    torch.manual_seed(1)
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    base = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        batch = [records[(step * 8 + i) % len(records)] for i in range(8)]
        loss = batch_loss(model, tokenizer, batch, seq2seq)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    return pathlib.Path(out_dir)


def batch_loss(model, tokenizer, records, seq2seq):
    """Mean cross-entropy over the target tokens, through transformers' own loss (labels=)."""
    if seq2seq:
        inputs = tokenizer([r["input"] for r in records], padding=True, return_tensors="pt")
        labels = tokenizer([r["target"] for r in records], padding=True, return_tensors="pt")["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        return model(**inputs, labels=labels).loss
    pairs = [causal_encoding(tokenizer, r) for r in records]
    length = max(len(ids) for ids, _ in pairs)
    ids = torch.tensor([ids + [0] * (length - len(ids)) for ids, _ in pairs])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in pairs])
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i, _ in pairs])
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def make_experts(model_dir, base, targets, seq2seq):
    """For each task: its expert's adapter directory, its training data and held-out data."""
    experts = {}
    for task in TASKS:
        directory = base / task
        directory.mkdir()
        train = task_examples(task, 256, seed=0)
        held_out = task_examples(task, 32, seed=1)
        train_expert(model_dir, train, directory / "adapter", targets, seq2seq)
        experts[task] = {"adapter": directory / "adapter", "data": write_jsonl(directory / "train.jsonl", train),
                         "held_out": write_jsonl(directory / "held_out.jsonl", held_out),
                         "train_records": train, "held_out_records": held_out}
    return experts


@pytest.fixture(scope="session")
def llama_experts(llama, tmp_path_factory):
    return make_experts(llama, tmp_path_factory.mktemp("llama-experts"), LLAMA_TARGETS, seq2seq=False)


@pytest.fixture(scope="session")
def t5_experts(t5, tmp_path_factory):
    return make_experts(t5, tmp_path_factory.mktemp("t5-experts"), T5_TARGETS, seq2seq=True)


def copy_expert(expert, destination):
    """A copy of an expert's adapter directory (to alter or to write gates into)."""
    return pathlib.Path(shutil.copytree(expert["adapter"], destination))


def gated_peft_loss(model_dir, adapter, records, gates, seq2seq):
    """The loss of the gated expert computed the official way, independently of the tools: PEFT applies the LoRA,
    and a pre-hook on each lora_A multiplies the layer's input by sigmoid(v . x) (learn_input_gate="only_sigmoid").
    `gates` is {module: array}, or None for zero gates."""
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    base = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            plain = name.removeprefix("base_model.model.")
            v = torch.zeros(module.in_features) if gates is None else torch.from_numpy(np.asarray(gates[plain]))
            module.lora_A["default"].register_forward_pre_hook(lambda m, args, v=v: (args[0] * torch.sigmoid(args[0] @ v).unsqueeze(-1),))
    with torch.no_grad():
        return batch_loss(model, tokenizer, records, seq2seq).item()


def phatgoose_tool():
    """The `phatgoose` executable (PHATGOOSE_BIN, else the repository's release or debug build), or None."""
    explicit = os.environ.get("PHATGOOSE_BIN")
    if explicit:
        return explicit
    for configuration in ("release", "debug"):
        candidate = ROOT / ".build" / configuration / "phatgoose"
        if candidate.exists():
            return str(candidate)
    return None


def run_module(module, *arguments, env=None, code=None, background=False):
    """`python -m phatgoose.<module> ARGUMENTS` (or `python -c CODE ARGUMENTS`) in a subprocess with this
    interpreter: its CompletedProcess (text), or with `background` its Popen (bytes pipes)."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT / "python"), OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable, *(["-c", code] if code else ["-m", f"phatgoose.{module}"]), *map(str, arguments)]
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    return subprocess.run(command, capture_output=True, text=True, env=environment)

"""What `phatgoose.train_gates` and `phatgoose.average_activation` share: reading and checking their inputs (a PEFT
LoRA adapter, JSON-lines data, a transformers model), tokenising and batching, running the model with the expert's
LoRA beside its linear layers, the progress bar, the atomic write of the gates file and the command-line plumbing.

The numpy-only parts (arguments, adapter, data, output checks) run before PyTorch is imported, so `--help` and the
cheap input errors need neither PyTorch nor libphatgoose, and a bad data file is reported before a model is loaded.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import tempfile

import numpy as np

from . import safetensors

GATES_FILE = "gates.safetensors"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
IGNORE_INDEX = -100  # the label of a token that is not scored (PyTorch's cross_entropy default)

# A PEFT LoRA tensor: base_model.model.<module>.lora_A.weight ([r, in]) or .lora_B.weight ([out, r]).
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# adapter_config.json fields that, when set, make an adapter compute something other than W x + scale * B (A x)
# on a Linear layer: field -> (what plain LoRA has, what the field turns on). Init-only options (LoftQ, EVA, CorDA,
# LoRA-GA) and module selection (layers_to_transform, exclude_modules) are not here: the tensors are what counts.
_VARIANTS = {
    "use_dora": ("false", "a DoRA adapter"),
    "bias": ("\"none\"", "trained biases of the base model"),
    "lora_bias": ("false", "a bias on lora_B"),
    "modules_to_save": ("none", "fully trained modules beside the LoRA"),
    "trainable_token_indices": ("none", "trained token embeddings"),
    "target_parameters": ("none", "LoRA on parameters rather than Linear layers"),
    "layer_replication": ("none", "replicated layers"),
    "alora_invocation_tokens": ("none", "activated LoRA, applied only after its invocation tokens"),
    "use_qalora": ("false", "QA-LoRA, whose A reads pooled inputs"),
    "use_bdlora": ("none", "block-diagonal LoRA"),
    "monteclora_config": ("none", "MonteCLoRA, a sampled LoRA"),
    "kasa_config": ("none", "KaSA"),
    "arrow_config": ("none", "PEFT's Arrow routing"),
}
# Files in a model directory that make it carry its own tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")


class InputError(Exception):
    """Bad input or data. The message is one line naming the file, module or field, what was expected and what was
    found; the command prints it and exits 1."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException like KeyboardInterrupt, so that it unwinds through every `except Exception`
    and each `finally` removes what it made."""


# ---------------------------------------------------------------------------------------------------------------------
# Adapter


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer of an expert: `delta(x) = scale * B (A x)`."""
    name: str         # the module's qualified name in the base model
    a: np.ndarray     # lora_A, float32 [r, in]
    b: np.ndarray     # lora_B, float32 [out, r]
    scale: float      # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

    @property
    def in_features(self):
        return self.a.shape[1]

    @property
    def out_features(self):
        return self.b.shape[0]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter directory: its two files and its modules in file order."""
    directory: str
    config_path: str
    weights_path: str
    modules: dict     # name -> LoraModule


def _pattern_value(patterns, name, default, config_path, field):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key, in file order, for which `(.*\\.)?(KEY)$`
    matches the whole module name; else the global value."""
    for key, value in patterns.items():
        try:
            matches = re.fullmatch(rf"(.*\.)?({key})", name) is not None
        except re.error as error:
            raise InputError(f"{config_path}: field \"{field}\": key {key!r} is not a regular expression ({error})") from None
        if matches:
            integer = isinstance(value, int) and not isinstance(value, bool)
            if not (integer and value >= 1 if field == "rank_pattern" else
                    (integer or isinstance(value, float)) and math.isfinite(value)):
                expected = "an integer >= 1" if field == "rank_pattern" else "a finite number"
                raise InputError(f"{config_path}: field \"{field}\": key {key!r}: expected {expected}, found {json.dumps(value)}")
            return value
    return default


def _config_field(config, field, default, kinds, config_path, describe):
    value = config.get(field)
    if value is None:  # absent or null: PEFT's default
        value = default
    # bool is an int in Python; a number field must not accept true/false.
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise InputError(f"{config_path}: field \"{field}\": expected {describe}, found {json.dumps(value)}")
    return value


def read_adapter(directory):
    """Reads and checks the PEFT LoRA adapter in `directory` by the runtime loader's rules (docs/formats.md): plain
    LoRA only (peft_type LORA, none of the variants in _VARIANTS, which adds PEFT's newer ones to the runtime's
    DoRA, bias and modules_to_save), and only `lora_A` / `lora_B` weights, finite, in pairs whose rank is the
    config's for the module. Returns an `Adapter` whose modules are in file order."""
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isdir(directory):
        raise InputError(f"{directory}: expected a PEFT LoRA adapter directory, found no directory")
    try:
        with open(config_path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except OSError as error:
        raise InputError(f"{config_path}: cannot read the adapter config ({error.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{config_path}: expected a JSON object, found invalid JSON ({error})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object, found {type(config).__name__}")

    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(f"{config_path}: field \"peft_type\": expected \"LORA\" (plain LoRA), found {json.dumps(peft_type)}")
    for field, (expected, variant) in _VARIANTS.items():
        value = config.get(field)
        if value not in (None, False, [], {}, "none"):
            raise InputError(f"{config_path}: field \"{field}\": expected {expected} (plain LoRA), found "
                             f"{json.dumps(value)} ({variant})")
    rank = _config_field(config, "r", 8, (int,), config_path, "an integer >= 1")
    alpha = _config_field(config, "lora_alpha", 8, (int, float), config_path, "a number")
    rslora = _config_field(config, "use_rslora", False, (bool,), config_path, "true or false")
    rank_pattern = _config_field(config, "rank_pattern", {}, (dict,), config_path, "an object") or {}
    alpha_pattern = _config_field(config, "alpha_pattern", {}, (dict,), config_path, "an object") or {}
    if rank < 1 or not math.isfinite(alpha):
        raise InputError(f"{config_path}: expected r >= 1 and a finite lora_alpha, found r {rank}, lora_alpha {alpha}")

    try:
        tensors = safetensors.load(weights_path)
    except OSError as error:
        raise InputError(f"{weights_path}: cannot read the adapter weights ({error.strerror})") from None
    except safetensors.SafetensorsError as error:
        raise InputError(str(error)) from None
    pairs = {}
    for key, array in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise InputError(f"{weights_path}: tensor '{key}': expected only base_model.model.<module>.lora_A.weight "
                             f"and .lora_B.weight (plain LoRA), found {_describe_key(key)}")
        pairs.setdefault(match.group(1), {})[match.group(2)] = array
    if not pairs:
        raise InputError(f"{weights_path}: expected LoRA tensors, found none")

    modules = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InputError(f"{weights_path}: module '{name}': expected lora_A and lora_B, found no {missing}")
        a, b = pair["A"], pair["B"]
        module_rank = _pattern_value(rank_pattern, name, rank, config_path, "rank_pattern")
        module_alpha = _pattern_value(alpha_pattern, name, alpha, config_path, "alpha_pattern")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != module_rank or b.shape[1] != module_rank:
            raise InputError(f"{weights_path}: module '{name}': expected lora_A [{module_rank}, in] and lora_B "
                             f"[out, {module_rank}] (rank {module_rank} from {CONFIG_FILE}), found lora_A "
                             f"{list(a.shape)} and lora_B {list(b.shape)}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise InputError(f"{weights_path}: module '{name}': expected finite weights, found NaN or infinity")
        scale = module_alpha / (math.sqrt(module_rank) if rslora else module_rank)
        modules[name] = LoraModule(name, a.astype(np.float32), b.astype(np.float32), float(scale))
    return Adapter(directory, config_path, weights_path, modules)


def _describe_key(key):
    """What a tensor that plain LoRA does not have is, for the error message."""
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude vector"
    if "lora_embedding_" in key:
        return "an embedding LoRA"
    if re.search(r"\.lora_[AB]\.bias$", key):
        return "a LoRA bias"
    if "modules_to_save" in key:
        return "a modules_to_save weight"
    return "a tensor of another kind"


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Example:
    line: int         # 1-based line number in the data file, for errors
    input: str
    target: str


def read_examples(path):
    """The examples of a JSON-lines file, each line an object with string fields `input` and `target` (other fields
    are ignored; blank lines are skipped)."""
    examples = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(f"{path}: line {number}: expected UTF-8 text, found undecodable bytes") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}: line {number}: expected a JSON object, found invalid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}: line {number}: expected a JSON object with \"input\" and \"target\", "
                                     f"found {type(record).__name__}")
                for field in ("input", "target"):
                    if field not in record:
                        raise InputError(f"{path}: line {number}: expected a field \"{field}\", found none")
                    if not isinstance(record[field], str):
                        raise InputError(f"{path}: line {number}: field \"{field}\": expected a string, found "
                                         f"{json.dumps(record[field])}")
                examples.append(Example(number, record["input"], record["target"]))
    except OSError as error:
        raise InputError(f"{path}: cannot read the data ({error.strerror})") from None
    if not examples:
        raise InputError(f"{path}: expected JSON lines {{\"input\": ..., \"target\": ...}}, found no examples")
    return examples


def example_order(count, seed):
    """An endless stream of example indices: successive permutations of range(count), each drawn from one numpy
    generator seeded with `seed`. Training takes batches from it in order; average activation takes its first
    examples (a sample without replacement)."""
    if count < 1:
        raise ValueError("expected at least one example")  # an empty permutation would never yield
    generator = np.random.default_rng(seed)
    while True:
        yield from (int(i) for i in generator.permutation(count))


# ---------------------------------------------------------------------------------------------------------------------
# Output


def model_files(model, gguf_file):
    """The local files of a model: every file directly in its directory, and the GGUF file."""
    files = []
    if os.path.isdir(model):
        with os.scandir(model) as entries:
            files += [entry.path for entry in entries if entry.is_file()]
        if gguf_file:
            files.append(os.path.join(model, gguf_file))
    elif gguf_file:
        files.append(gguf_file)
    return files


def check_output(out, inputs):
    """Refuses an output path whose directory does not exist, that is a directory, or that is one of `inputs`
    (compared after resolving symlinks, and by device and inode, so a hard link is caught too)."""
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise InputError(f"{out}: expected an output path in an existing directory, found no directory {directory}")
    if os.path.isdir(out):
        raise InputError(f"{out}: expected an output file, found a directory")
    real = os.path.realpath(out)
    try:
        identity = os.stat(out)
    except OSError:
        identity = None  # does not exist yet: it cannot be a hard link to anything
    for path in inputs:
        same = os.path.realpath(path) == real
        if not same and identity is not None:
            with contextlib.suppress(OSError):
                other = os.stat(path)
                same = (other.st_dev, other.st_ino) == (identity.st_dev, identity.st_ino)
        if same:
            raise InputError(f"{out}: expected an output that is not an input, found the same file as {path}")


def write_gates(path, gates):
    """Writes `gates` ({module: float32 [in]}) as a safetensors file at `path` atomically: into a temporary file in
    the same directory, then renamed over `path`. On any failure or interruption the temporary file is removed and
    `path` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.close(descriptor)
        safetensors.save(temporary, {name: np.ascontiguousarray(gate, dtype=np.float32) for name, gate in gates.items()})
        # mkstemp makes the file private (0600); give it the mode an ordinary new file would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Model


def import_torch():
    """PyTorch and transformers, or an InputError saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise InputError(f"this tool needs PyTorch and transformers ({error}); install them with "
                         "pip install 'phatgoose[train]'") from None
    return torch, transformers


def _one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_model(model, gguf_file, quiet):
    """The model (float32, evaluation mode, every parameter frozen), its tokenizer, and whether it is an
    encoder-decoder model. With `gguf_file`, transformers reads the weights (dequantised) and the config from that
    file; the tokenizer comes from the model directory when it holds one, else from the GGUF file. `quiet` also
    silences transformers' own logging and progress bars, for the whole process."""
    torch, transformers = import_torch()
    if quiet:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    where = f"{model} ({gguf_file})" if gguf_file else model
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = transformers.AutoConfig.from_pretrained(model, **extra)
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
        network = auto.from_pretrained(model, dtype=torch.float32, **extra)
        own_tokenizer = os.path.isdir(model) and any(os.path.exists(os.path.join(model, name)) for name in _TOKENIZER_FILES)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, **({} if own_tokenizer else extra))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise InputError(f"{where}: cannot load the model ({_one_line(error)})") from None
    # Evaluation mode: no dropout anywhere (LoRA dropout is off in the recipe; the base model's own dropout is
    # off too, so the gate learns against the forward pass that inference runs).
    network.eval()
    network.requires_grad_(False)
    if not seq2seq and tokenizer.eos_token_id is None:
        raise InputError(f"{where}: expected a tokenizer with an end-of-sequence token, found none")
    return network, tokenizer, seq2seq


def bind_modules(network, adapter, model):
    """{name: (torch.nn.Linear, LoraModule)} for every module of the adapter, in the model's module order; refuses a
    module the model does not have, one that is not a Linear layer, and one whose widths differ from the adapter's."""
    torch, _ = import_torch()
    found = dict(network.named_modules())
    for name, lora in adapter.modules.items():
        layer = found.get(name)
        if layer is None:
            raise InputError(f"{adapter.weights_path}: module '{name}': expected a module of the model {model}, found none")
        if not isinstance(layer, torch.nn.Linear):
            raise InputError(f"{adapter.weights_path}: module '{name}': expected a torch.nn.Linear in the model, found "
                             f"{type(layer).__name__}")
        if (layer.in_features, layer.out_features) != (lora.in_features, lora.out_features):
            raise InputError(f"{adapter.weights_path}: module '{name}': the adapter maps {lora.in_features} -> "
                             f"{lora.out_features} features, the model's layer {layer.in_features} -> {layer.out_features}")
    return {name: (layer, adapter.modules[name]) for name, layer in found.items() if name in adapter.modules}


@contextlib.contextmanager
def lora_beside(bound, gates=None):
    """Within the block, each bound Linear layer computes `W x + g(x) * scale * B (A x)`, with `g(x) =
    sigmoid(v . x)` for the module's gate `v` in `gates` ({name: tensor [in]}), or 1 without gates. A and B are
    plain tensors, not parameters: nothing of the LoRA can be trained."""
    torch, _ = import_torch()
    handles = []

    def hook_for(name, lora):
        a, b = torch.from_numpy(lora.a), torch.from_numpy(lora.b)
        gate = None if gates is None else gates[name]

        def hook(module, arguments, output):
            x = arguments[0]
            inner = x @ a.T * lora.scale  # [..., r]
            if gate is not None:
                # The official code multiplies the layer's input by the gate before the LoRA; the gate is a
                # per-token scalar, so scaling the rank-r activations is the same product.
                inner = inner * torch.sigmoid(x @ gate).unsqueeze(-1)
            return output + inner @ b.T
        return hook

    try:
        for name, (layer, lora) in bound.items():
            handles.append(layer.register_forward_hook(hook_for(name, lora)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------------------
# Tokens and batches


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised example. Causal LM: `ids` is input + target + eos and `labels` the same with the input part
    IGNORE_INDEX. Seq2seq: `ids` the encoder's input, `labels` the target."""
    example: Example
    ids: list
    labels: list


def encode(tokenizer, examples, seq2seq, max_length, data_path):
    """Tokenises every example. Causal LM: `tok(input)` (with the tokenizer's special tokens, e.g. BOS) +
    `tok(target)` (without them) + [eos], at most `max_length` tokens: the target part is kept first, the input is
    cut at its end. Seq2seq: the input and the target are each tokenised as the tokenizer does (T5 appends eos) and
    cut to `max_length`."""
    encoded = []
    for example in examples:
        if seq2seq:
            ids = tokenizer(example.input)["input_ids"][:max_length]
            labels = tokenizer(example.target)["input_ids"][:max_length]
            if not ids:
                raise InputError(f"{data_path}: line {example.line}: expected an input of at least one token, found none")
        else:
            prompt = tokenizer(example.input)["input_ids"]
            answer = (tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
            prompt = prompt[:max_length - len(answer)]
            ids = prompt + answer
            labels = [IGNORE_INDEX] * len(prompt) + answer
        if not labels:
            raise InputError(f"{data_path}: line {example.line}: expected a target of at least one token, found none")
        encoded.append(Encoded(example, ids, labels))
    return encoded


def collate(network, tokenizer, items, seq2seq):
    """A padded batch: the model's keyword arguments, the labels to score, and the 0/1 masks of real tokens by
    sequence length ({length: mask [batch, length]}), which say which tokens a module's input holds. Padding is on
    the right and never attended to or scored. In an encoder-decoder batch the decoder is padded one position
    further when both would have the same length, so that a module's input length tells which side it is on."""
    torch, _ = import_torch()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(rows, value, length):
        return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)

    def real(rows, length):
        return torch.tensor([[1.0] * len(row) + [0.0] * (length - len(row)) for row in rows])

    ids = [item.ids for item in items]
    labels = [item.labels for item in items]
    length = max(map(len, ids))
    arguments = {"input_ids": padded(ids, pad, length), "attention_mask": real(ids, length).long(), "use_cache": False}
    masks = {length: real(ids, length)}
    if not seq2seq:
        return arguments, padded(labels, IGNORE_INDEX, length), masks
    target_length = max(map(len, labels))
    if target_length == length:
        target_length += 1
    target = padded(labels, IGNORE_INDEX, target_length)
    arguments["decoder_input_ids"] = network.prepare_decoder_input_ids_from_labels(labels=target)
    arguments["decoder_attention_mask"] = real(labels, target_length).long()
    masks[target_length] = real(labels, target_length)
    return arguments, target, masks


def target_loss(network, arguments, labels, seq2seq):
    """Mean cross-entropy over the target tokens of the batch (every label that is not IGNORE_INDEX)."""
    torch, _ = import_torch()
    logits = network(**arguments).logits
    if not seq2seq:  # a causal LM's position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------------------
# Progress and command line


class Progress:
    """A progress bar on stderr: tqdm when it is installed, else one rewritten line; nothing when quiet."""

    def __init__(self, total, description, quiet):
        self._quiet, self._total, self._description, self._done = quiet, total, description, 0
        self._bar = None
        if not quiet:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True)

    def update(self, count=1, **values):
        """Advances by `count` and shows `values` (e.g. loss=0.5)."""
        self._done += count
        if self._quiet:
            return
        shown = ", ".join(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
                          for key, value in values.items())
        if self._bar is not None:
            if shown:
                self._bar.set_postfix_str(shown, refresh=False)
            self._bar.update(count)
        else:
            print(f"\r{self._description}: {self._done}/{self._total} {shown}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif not self._quiet:
            print(file=sys.stderr)


def add_common_arguments(parser):
    """The options both tools take."""
    parser.add_argument("--model", required=True, metavar="MODEL", help="a transformers model directory (or hub id)")
    parser.add_argument("--gguf-file", metavar="F", help="load the model's weights and config from this GGUF file (a file name in "
                        "the --model directory or a path)")
    parser.add_argument("--adapter", required=True, metavar="EXPERT_DIR", help="the expert: a PEFT LoRA adapter directory "
                        f"({CONFIG_FILE} and {WEIGHTS_FILE})")
    parser.add_argument("--data", required=True, metavar="TRAIN.jsonl", help='JSON lines, each {"input": str, "target": str}')
    parser.add_argument("--batch-size", type=positive, default=8, metavar="B", help="examples per batch (default 8)")
    parser.add_argument("--max-length", type=positive, default=512, metavar="L",
                        help="tokens per sequence at most (default 512): a causal LM's input + target + eos, its input "
                        "cut first; a seq2seq model's input and target each")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="the seed of the example order (default 0)")
    parser.add_argument("--out", metavar="FILE", help=f"the gates file to write (default EXPERT_DIR/{GATES_FILE})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def positive(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}")
    return value


def checked_inputs(model, gguf_file, adapter_directory, data, out):
    """The adapter, the examples and the output path (default EXPERT_DIR/gates.safetensors), each checked; no model
    is loaded yet."""
    adapter = read_adapter(adapter_directory)
    examples = read_examples(data)
    out = out or os.path.join(adapter_directory, GATES_FILE)
    check_output(out, [adapter.config_path, adapter.weights_path, data, *model_files(model, gguf_file)])
    return adapter, examples, out


def run(program, parser, body, argv):
    """Parses `argv` and runs `body(arguments)`: exit 0 on success, 1 on an InputError (one line on stderr), 130 on
    SIGINT and 143 on SIGTERM (after `finally` blocks ran, so no partial file is left); argparse exits 2 on a
    usage error."""
    arguments = parser.parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum, frame):
        raise Terminated()

    with contextlib.suppress(ValueError):  # not the main thread: leave SIGTERM alone
        signal.signal(signal.SIGTERM, terminate)
    try:
        body(arguments)
        return 0
    except InputError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{program}: terminated; nothing written", file=sys.stderr)
        return 143
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)

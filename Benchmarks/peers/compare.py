#!/usr/bin/env python3
"""Phatgoose vs PyTorch on CPU, one routed layer, workloads W1-W4, side by side.

Runs `phatgoose bench --format json --threads N --impl runtime --workload W... --seconds S --dtype D` and
`torch_routed_layer.py --format json --threads N --workload W... --seconds S --dtype D` one after the other, for each
weight dtype (bf16 and f32 by default: the implementations alternate, dtype by dtype, round by round), and prints
one table: per workload and weight dtype, the median (and p90) microseconds per call of each and the speed-up
(torch time / phatgoose time). Torch runs twice per dtype by default: with glibc malloc as it comes, and with
malloc tunables that keep freed blocks in the heap (--torch-malloc; see README.md for why). With --rounds R > 1 every
number is the median over the rounds.

Measure with nothing else running: on a shared machine hold the build lock for the whole run,
    flock /tmp/phatgoose-build.lock python3 Benchmarks/peers/compare.py --torch-python /opt/phatgoose-torch/bin/python

This script needs only the Python standard library; the torch script runs under --torch-python (default: the
interpreter in $PHATGOOSE_TORCH_PYTHON, else this one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TORCH_SCRIPT = os.path.join(HERE, "torch_routed_layer.py")
# glibc malloc tunables: serve every buffer up to 32 MiB from the heap and never trim it, so the per-call tensors of a
# torch forward reuse memory instead of mmap-ing (and page-faulting) fresh pages on every call.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def run_json(command: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    print(f"[compare] {what}: {prefix + ' ' if prefix else ''}{' '.join(command)}", file=sys.stderr, flush=True)
    environment = dict(os.environ)
    for name in TUNED_MALLOC:
        environment.pop(name, None)
    environment.update(env or {})
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"compare.py: {what} failed with exit code {completed.returncode}")
    text = completed.stdout
    start = text.find("{")
    if start < 0:
        raise SystemExit(f"compare.py: {what} printed no JSON:\n{text[:2000]}")
    return json.loads(text[start:])


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stale_binary(binary: str) -> str | None:
    """The newest source file under Sources/ that is newer than the binary, if any."""
    try:
        built = os.path.getmtime(binary)
    except OSError:
        return None
    newest = None
    for root, _, files in os.walk(os.path.join(REPO, "Sources")):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getmtime(path) > built and (newest is None or os.path.getmtime(path) > os.path.getmtime(newest)):
                newest = path
    return newest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", nargs="?", default=None,
                        help="phatgoose executable (default .build/release/phatgoose, from the current directory, "
                             "else from the repository root)")
    parser.add_argument("--torch-python", default=os.environ.get("PHATGOOSE_TORCH_PYTHON", sys.executable),
                        help="Python interpreter that has torch (default $PHATGOOSE_TORCH_PYTHON, else this one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per workload and implementation")
    parser.add_argument("--workload", action="append", choices=["W1", "W2", "W3", "W4"],
                        help="repeatable (default W1 W2 W3 W4)")
    parser.add_argument("--dtypes", default="bf16,f32", help="weight dtypes to compare, comma-separated (default bf16,f32)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the alternation; report medians over rounds")
    parser.add_argument("--torch-data", choices=["tasks", "random"], default="tasks")
    parser.add_argument("--torch-malloc", choices=["default", "tuned", "both"], default="both",
                        help="run torch with glibc malloc as it comes (default), with the tunables that keep freed "
                             "blocks in the heap (tuned: " + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items()) +
                             "), or both (the default)")
    parser.add_argument("--raw", help="also write every raw JSON document to this file")
    parser.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    args = parser.parse_args()

    binary = args.binary
    if binary is None:
        binary = ".build/release/phatgoose"
        if not os.path.exists(binary):
            binary = os.path.join(REPO, ".build/release/phatgoose")
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"compare.py: {binary}: no phatgoose executable (build it: swift build -c release)")
    newer = stale_binary(binary)
    if newer:
        print(f"[compare] warning: {newer} is newer than {binary}; rebuild for current numbers", file=sys.stderr)
    workloads = args.workload or ["W1", "W2", "W3", "W4"]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in ("f32", "bf16"):
            raise SystemExit(f"compare.py: --dtypes: expected f32 or bf16, found {d}")

    torch_configs = ["default", "tuned"] if args.torch_malloc == "both" else [args.torch_malloc]
    workload_flags = [flag for w in workloads for flag in ("--workload", w)]
    raw = []
    # (workload, dtype) -> {"phatgoose": [result per round], "phatgoose1": [...], "torch": [...]}
    table: dict[tuple[str, str], dict[str, list[dict]]] = {}
    torch_version = None
    for round_index in range(args.rounds):
        for dtype in dtypes:
            pg = run_json([binary, "bench", "--format", "json", "--threads", str(args.threads), "--impl", "runtime",
                           *workload_flags, "--seconds", str(args.seconds), "--dtype", dtype],
                          f"round {round_index + 1} phatgoose {dtype}")
            for r in pg["results"]:
                if r.get("impl") != "runtime":
                    continue
                key = "phatgoose" if r["threads"] == args.threads else "phatgoose1" if r["threads"] == 1 else None
                if key:
                    table.setdefault((r["workload"], dtype), {}).setdefault(key, []).append(r)
            record = {"round": round_index + 1, "dtype": dtype, "phatgoose": pg}
            for config in torch_configs:
                th = run_json([args.torch_python, TORCH_SCRIPT, "--format", "json", "--threads", str(args.threads),
                               *workload_flags, "--seconds", str(args.seconds), "--dtype", dtype,
                               "--data", args.torch_data],
                              f"round {round_index + 1} torch {dtype} malloc {config}",
                              TUNED_MALLOC if config == "tuned" else None)
                record["torch_" + config] = th
                torch_version = th.get("torch_version")
                for r in th["results"]:
                    table.setdefault((r["workload"], dtype), {}).setdefault("torch_" + config, []).append(r)
            raw.append(record)

    def med(results: list[dict] | None, field: str) -> float | None:
        return statistics.median(r[field] for r in results) if results else None

    rows = []
    for dtype in dtypes:
        for w in workloads:
            entry = table.get((w, dtype), {})
            pg, pg1 = entry.get("phatgoose"), entry.get("phatgoose1")
            row = {
                "workload": w, "dtype": dtype,
                "phatgoose_us_median": med(pg, "us_per_call_median"), "phatgoose_us_p90": med(pg, "us_per_call_p90"),
                "phatgoose_gflops": med(pg, "gflops"), "phatgoose_1thread_us_median": med(pg1, "us_per_call_median"),
                "phatgoose_active_experts": pg[0].get("active_experts") if pg else None,
            }
            for config in torch_configs:
                th = entry.get("torch_" + config)
                row[f"torch_{config}_us_median"] = med(th, "us_per_call_median")
                row[f"torch_{config}_us_p90"] = med(th, "us_per_call_p90")
                row[f"torch_{config}_gflops"] = med(th, "gflops")
                row["torch_active_experts"] = th[0].get("active_experts") if th else None
                p, t = row["phatgoose_us_median"], row[f"torch_{config}_us_median"]
                row[f"speedup_torch_{config}_over_phatgoose"] = t / p if p and t else None
            rows.append(row)

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads, "seconds": args.seconds,
        "rounds": args.rounds, "torch_version": torch_version, "phatgoose": os.path.abspath(binary),
        "torch_data": args.torch_data, "torch_malloc": args.torch_malloc, "tuned_malloc_env": TUNED_MALLOC,
    }
    if args.raw:
        with open(args.raw, "w") as handle:
            json.dump({"meta": meta, "runs": raw}, handle, indent=1)
    if args.format == "json":
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return 0

    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    header = ["workload", "weights", f"phatgoose us ({args.threads}t) med/p90"]
    for config in torch_configs:
        header.append(f"torch{'' if config == 'default' else ' +malloc'} us med/p90")
    for config in torch_configs:
        header.append("speed-up" + ("" if config == "default" else " vs +malloc"))
    header += ["phatgoose GFLOP/s", "torch GFLOP/s" + (" (best)" if len(torch_configs) > 1 else ""),
               "phatgoose 1t us", "active experts pg/torch"]
    lines = []
    for r in rows:
        line = [r["workload"], r["dtype"], fmt(r["phatgoose_us_median"], ".0f") + " / " + fmt(r["phatgoose_us_p90"], ".0f")]
        for config in torch_configs:
            line.append(fmt(r[f"torch_{config}_us_median"], ".0f") + " / " + fmt(r[f"torch_{config}_us_p90"], ".0f"))
        for config in torch_configs:
            line.append(fmt(r[f"speedup_torch_{config}_over_phatgoose"], ".2f") + "x")
        best = [r[f"torch_{config}_gflops"] for config in torch_configs if r[f"torch_{config}_gflops"] is not None]
        line += [fmt(r["phatgoose_gflops"], ".1f"), fmt(max(best) if best else None, ".1f"),
                 fmt(r["phatgoose_1thread_us_median"], ".0f"), f"{r['phatgoose_active_experts']}/{r['torch_active_experts']}"]
        lines.append(line)
    print(f"{meta['date']}  {meta['cpu']}, {meta['cpus']} CPUs, {args.threads} threads, torch {torch_version}, "
          f"{args.seconds:g} s per measurement, {args.rounds} round(s); speed-up = torch time / phatgoose time")
    if args.format == "markdown":
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(widths[i]) if i > 1 else h.ljust(widths[i]) for i, h in enumerate(header)))
        for line in lines:
            print("  ".join(c.rjust(widths[i]) if i > 1 else c.ljust(widths[i]) for i, c in enumerate(line)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

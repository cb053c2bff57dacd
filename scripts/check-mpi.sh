#!/usr/bin/env bash
# Scale-out checks on loopback (docs/scale-out.md), against a built phatgoose:
#   bash scripts/check-mpi.sh BIN
# apply --mpi on 2 and 4 ranks (and the serve-experts form) writes the bytes of a single-process apply; a library
# over the per-process memory cap is refused by one process and served by 4 ranks; loadtest --mpi completes with
# zero errors and each rank holds about 1/R of the expert weights; a killed serving rank ends the run with an error
# and a stopped (hung) one with rank 0's timeout error, both within a bounded time.
set -euo pipefail
bin="${1:?usage: check-mpi.sh BIN}"
command -v mpirun >/dev/null || { echo "check-mpi: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# As root, OpenMPI's launcher wants both confirmations; more ranks than cores need --oversubscribe.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
run() { timeout 300 mpirun --oversubscribe "$@"; }
fail() { echo "check-mpi: $*" >&2; exit 1; }

"$bin" synth --out "$work/lib" --experts 12 --activations "$work/x.safetensors" --tokens 40 >/dev/null
"$bin" pack "$work/lib" --out "$work/lib.phatpack" >/dev/null
"$bin" apply --library "$work/lib" --input "$work/x.safetensors" --output "$work/one.safetensors" >/dev/null
for np in 2 4; do
  run -np "$np" "$bin" apply --mpi --library "$work/lib.phatpack" --input "$work/x.safetensors" --output "$work/mpi$np.safetensors" >/dev/null
  cmp "$work/one.safetensors" "$work/mpi$np.safetensors" || fail "apply --mpi on $np ranks: expected the single-process bytes, found others"
  echo "apply --mpi, $np ranks: the same bytes as one process"
done
# Arrow, top-3, the three hottest experts on every rank; the host and the serving ranks as separate programs.
"$bin" apply --library "$work/lib" --input "$work/x.safetensors" --output "$work/arrow.safetensors" --top-k 3 --router arrow >/dev/null
run -np 1 "$bin" apply --mpi --replicate-hot 3 --library "$work/lib" --input "$work/x.safetensors" --output "$work/arrow-mpi.safetensors" \
  --top-k 3 --router arrow : -np 3 "$bin" serve-experts --library "$work/lib.phatpack" >/dev/null
cmp "$work/arrow.safetensors" "$work/arrow-mpi.safetensors" || fail "apply --mpi with serve-experts and replicas: expected the single-process bytes"
echo "apply --mpi : serve-experts, 4 ranks, 3 replicated experts, arrow top-3: the same bytes as one process"

# The memory cap: 40% of the library's expert weights is too little for one process (or for 2 ranks), enough for 4.
weights="$("$bin" apply --library "$work/lib" --input "$work/x.safetensors" --output "$work/never.safetensors" --memory-cap 0 2>&1 | sed -n 's/.*found \([0-9]*\) in its.*/\1/p' || true)"
[ -n "$weights" ] || fail "apply --memory-cap 0: expected a refusal naming the library's expert bytes"
[ ! -e "$work/never.safetensors" ] || fail "apply --memory-cap 0: expected no output file"
cap=$(( weights * 2 / 5 ))
if "$bin" apply --library "$work/lib" --input "$work/x.safetensors" --output "$work/capped.safetensors" --memory-cap "$cap" 2>"$work/cap.err"; then
  fail "apply --memory-cap $cap: expected one process to refuse $weights bytes of experts"
fi
grep -q "memory cap" "$work/cap.err" || fail "apply --memory-cap: expected a memory-cap message, found: $(cat "$work/cap.err")"
if run -np 2 "$bin" apply --mpi --memory-cap "$cap" --library "$work/lib" --input "$work/x.safetensors" --output "$work/capped.safetensors" \
    >/dev/null 2>"$work/cap2.err"; then
  fail "apply --mpi --memory-cap $cap on 2 ranks: expected a refusal (half the library each)"
fi
grep -q "memory cap" "$work/cap2.err" || fail "apply --mpi --memory-cap on 2 ranks: expected a memory-cap message"
[ ! -e "$work/capped.safetensors" ] || fail "a refused apply --mpi left an output file"
run -np 4 "$bin" apply --mpi --memory-cap "$cap" --library "$work/lib" --input "$work/x.safetensors" --output "$work/capped.safetensors" >/dev/null
cmp "$work/one.safetensors" "$work/capped.safetensors" || fail "apply --mpi --memory-cap on 4 ranks: expected the single-process bytes"
echo "memory cap $cap of $weights bytes: refused by one process and by 2 ranks, served by 4 ranks"

# loadtest --mpi: zero errors, each rank about a quarter of the weights.
run -np 4 "$bin" loadtest --mpi --library "$work/lib.phatpack" --clients 2 --duration 4 --warmup 1 --progress none \
  --format json --output "$work/load.json"
python3 - "$work/load.json" "$weights" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
weights = int(sys.argv[2])
errors = report["rejected"] + report["failed"] + report["unfinished"]
assert report["completed"] > 0 and errors == 0, "loadtest --mpi: expected completed requests and no errors, found %d completed, %d errors" % (report["completed"], errors)
ranks = report["ranks"]
assert [r["rank"] for r in ranks] == [0, 1, 2, 3], "loadtest --mpi: expected ranks 0-3, found %r" % ranks
held = [r["resident_bytes"] for r in ranks]
assert sum(held) == weights, "loadtest --mpi: expected the ranks to hold %d bytes in all, found %d" % (weights, sum(held))
for r in ranks:
    share = r["resident_bytes"] / weights
    assert 0.15 <= share <= 0.35, "loadtest --mpi: expected rank %d to hold about 1/4 of the weights, found %.2f" % (r["rank"], share)
print("loadtest --mpi, 4 ranks: %d requests, no errors; weight shares %s" % (report["completed"], ", ".join("%.2f" % (h / weights) for h in held)))
PY

# A serving rank that dies, then one that hangs (SIGSTOP), in the middle of a long run.
rank_pid() {  # the pid of world rank $1 among the phatgoose processes
  for p in $(pgrep -f "phatgoose loadtest --mpi" || true); do
    if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1"; then echo "$p"; return; fi
  done
}
for how in KILL STOP; do
  start=$(date +%s)
  timeout 120 mpirun --oversubscribe -np 4 "$bin" loadtest --mpi --mpi-timeout 3 --library "$work/lib.phatpack" --clients 2 \
    --duration 60 --warmup 1 --progress none --output "$work/broken.txt" 2>"$work/broken.err" &
  launcher=$!
  victim=""
  for _ in $(seq 100); do
    sleep 0.1
    victim="$(rank_pid 2)"
    [ -n "$victim" ] && break
  done
  [ -n "$victim" ] || fail "loadtest --mpi: rank 2 never started"
  sleep 3
  kill "-$how" "$victim"
  rc=0
  wait "$launcher" || rc=$?
  elapsed=$(( $(date +%s) - start ))
  [ "$rc" -ne 0 ] || fail "SIG$how on a serving rank: expected the run to fail, found exit 0"
  [ "$rc" -ne 124 ] || fail "SIG$how on a serving rank: expected an error, found a hang (killed by the 120 s timeout)"
  [ "$elapsed" -lt 40 ] || fail "SIG$how on a serving rank: expected the run to end soon after, found $elapsed s"
  if [ "$how" = STOP ]; then
    grep -q "rank 2 did not answer within 3" "$work/broken.err" || fail "SIGSTOP on rank 2: expected rank 0's timeout naming rank 2, found: $(head -c 600 "$work/broken.err")"
  fi
  echo "SIG$how on serving rank 2 mid-run: the run ended with exit $rc after $elapsed s"
done

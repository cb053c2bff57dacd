#!/usr/bin/env bash
# Builds the libFuzzer targets with AddressSanitizer and runs each for a bounded time over its seed corpus.
# Usage: Fuzz/run.sh [SECONDS_PER_TARGET]   (default 60). Crashes land in fuzz-out/ and fail the run.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
scratch=../.build-fuzz
swift build -c release --scratch-path "$scratch" -Xswiftc -sanitize=fuzzer,address \
  -Xswiftc -DPHATGOOSE_FUZZING -Xswiftc -use-ld=lld
bin="$(swift build -c release --scratch-path "$scratch" --show-bin-path)"
mkdir -p ../fuzz-out
status=0
for target in FuzzSafetensors:safetensors FuzzAdapterConfig:adapter_config FuzzManifest:manifest FuzzPacked:packed FuzzTorchCheckpoint:torch; do
  name="${target%%:*}"; corpus="Corpus/${target##*:}"
  work="$(mktemp -d)"
  cp -r "$corpus"/. "$work"/
  echo "== $name: ${seconds}s over $corpus"
  if ! "$bin/$name" "$work" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=131072 \
       -artifact_prefix=../fuzz-out/"$name"- -print_final_stats=1 2>"../fuzz-out/$name.log"; then
    echo "!! $name found a failure:"; tail -n 40 "../fuzz-out/$name.log"; status=1
  else
    grep -E "stat::number_of_executed_units|stat::new_units_added" "../fuzz-out/$name.log" | tr '\n' ' '; echo
  fi
  rm -rf "$work"
done
exit $status

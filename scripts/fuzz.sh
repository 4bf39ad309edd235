#!/usr/bin/env bash
# Fuzzes pwhost with the cargo-fuzz (libFuzzer) targets in fuzz/ (see fuzz/README.md).
#
#   bash scripts/fuzz.sh smoke [SECONDS]             # CI: every target briefly, from its seeds
#   bash scripts/fuzz.sh campaign SECONDS [FEATURES] # every target for SECONDS, with statistics
#
# FEATURES are the fuzz crate's engine features (default: its defaults, wasmtime and wasmi;
# `all-engines` for every engine); FUZZ_TARGETS="host_calls config" runs only those targets. Findings land in fuzz/artifacts/TARGET/; a campaign's
# logs and grown corpora in fuzz/campaign/.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-smoke}
seconds=${2:-}
features=${3:-}

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
# No sanitizer: the Rust code is memory-safe outside its `unsafe` blocks, which the targets
# drive, and the engines' C and C++ would not be instrumented by one. Optimized without the
# engines' debug assertions (-O); fuzz/Cargo.toml turns assertions and overflow checks back
# on for pwhost's own crates.
build_flags=(--sanitizer none -O --fuzz-dir fuzz)
if [ -n "$features" ]; then
  build_flags+=(--features "$features")
fi
# FUZZ_TARGETS (space-separated) narrows the run to some targets.
read -r -a targets <<< "${FUZZ_TARGETS:-module_bytes host_calls smith_module config}"

# Seeds: the plugin corpus's small modules (scripts/setup.sh builds them) and the project's
# configurations and scenarios.
if [ ! -d plugins/dist/wat ]; then
  echo "fuzz: plugins/dist is missing: run scripts/setup.sh (or plugins/build.sh) first" >&2
  exit 1
fi
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds/module_bytes" "$seeds/config" "$seeds/host_calls" "$seeds/smith_module"
cp plugins/dist/wat/*.wasm plugins/dist/c/*.wasm plugins/dist/assemblyscript/*.wasm \
  "$seeds/module_bytes/"
for file in examples/*.yaml conformance/*.yaml; do
  cp "$file" "$seeds/config/${file//\//_}"
done
# The generators' seeds: fixed pseudo-random inputs big enough for whole plugins (the
# generators read their counts from the input; a short one makes a plugin of few calls).
offset=0
for target in host_calls smith_module; do
  for index in $(seq 16); do
    LC_ALL=C awk -v seed=$((offset + index)) \
      'BEGIN { srand(seed); for (i = 0; i < 16384; i++) printf "%c", int(rand() * 256) }' \
      > "$seeds/$target/seed-$index"
  done
  offset=100
done

# Inputs that once found a problem (fuzz/regressions/TARGET/), so that every run tries them again.
for target in "${targets[@]}"; do
  if [ -d "fuzz/regressions/$target" ]; then
    cp fuzz/regressions/"$target"/* "$seeds/$target/"
  fi
done

echo "== fuzz: building the targets"
cargo fuzz build "${build_flags[@]}"

max_len() {
  case "$1" in
    module_bytes) echo 262144 ;;
    config) echo 16384 ;;
    *) echo 65536 ;;
  esac
}

# Runs target $1 with corpus directories $2 and $3, logging to $4; extra libFuzzer flags after.
# The generators (host_calls, smith_module) get whole-size inputs from the start
# (-len_control=0): libFuzzer's default of growing inputs from a few bytes would make empty
# plugins for a long while.
run() {
  local target=$1 corpus=$2 seeds=$3 log=$4
  shift 4
  if cargo fuzz run "${build_flags[@]}" "$target" "$corpus" "$seeds" -- \
    -timeout=20 -rss_limit_mb=4096 -max_len="$(max_len "$target")" -len_control=0 \
    -print_final_stats=1 "$@" > "$log" 2>&1; then
    grep -E "pwhost-fuzz|stat::number_of_executed_units|stat::average_exec_per_sec" "$log" \
      | tail -n 3
  else
    echo "fuzz: $target found a problem; the log says:" >&2
    grep -E -A12 "panicked at|ERROR: libFuzzer|==ERROR|SUMMARY" "$log" | head -n 40 >&2
    grep -E "Test unit written to|artifact_prefix" "$log" >&2 || true
    return 1
  fi
}

case "$mode" in
  smoke)
    # Each target from its seeds, then new inputs for a bounded time; a crash, a panic, a
    # hang (timeout) or passing the memory limit fails the run.
    for target in "${targets[@]}"; do
      echo "== fuzz: $target"
      corpus=$(mktemp -d -p "$seeds")
      run "$target" "$corpus" "$seeds/$target" "$seeds/$target.log" \
        -seed=1 -max_total_time="${seconds:-30}"
    done
    ;;
  campaign)
    : "${seconds:?campaign needs SECONDS}"
    mkdir -p fuzz/campaign
    for target in "${targets[@]}"; do
      echo "== fuzz: $target for ${seconds}s"
      mkdir -p "fuzz/campaign/$target"
      PWHOST_FUZZ_STATS=1 run "$target" "fuzz/campaign/$target" "$seeds/$target" \
        "fuzz/campaign/$target.log" -max_total_time="$seconds"
    done
    ;;
  *)
    echo "usage: $0 smoke [SECONDS] | campaign SECONDS [FEATURES]" >&2
    exit 2
    ;;
esac

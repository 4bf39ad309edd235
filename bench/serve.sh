#!/usr/bin/env bash
# Requests/s and latency through `pwhost serve` with no plugin, with the corpus's http_headers
# plugin (Rust SDK) on wasmtime, WAMR, V8 and the null runtime (the same plugin compiled in), with
# lifecycle_bench (the benchmark plugin of `pwhost bench` and criterion: ten header reads, one
# header added, one log line) on wasmtime and the null runtime, and with body_rewrite on wasmtime; and through nginx as a reverse proxy to the same origin, with
# the same number of workers. wrk on loopback against an nginx origin; every run bounded in
# time; configurations alternated round by round so that a busy machine affects them alike.
# Prints a Markdown table (medians over the rounds; ratios to `pwhost serve` without plugins;
# the proxy process's CPU time per request, user and system, for the pwhost cases).
#
#   bash bench/serve.sh            # ROUNDS=3 DURATION=10s CONNECTIONS=32 WORKERS=1
#   SYSTEM_ALLOCATOR=1 bash bench/serve.sh   # also a build on the system allocator (cases
#                                            # none-sysalloc, bench-wasmtime-sysalloc)
#   CASES="none headers-wasmtime" PWHOST=new/pwhost BEFORE=old/pwhost bash bench/serve.sh
#       # only these cases, with a pwhost binary built elsewhere (no build here; it must have
#       # the cases' runtimes), each also as CASE-before with the binary BEFORE: two builds
#       # compared in one run
#
# Needs wrk and nginx (apt-get install wrk nginx) and the plugin corpus (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
WORKERS=${WORKERS:-1}
for tool in wrk nginx; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install wrk nginx)" >&2; exit 1; }
done
dist=$PWD/plugins/dist/rust
[ -f "$dist/http_headers.wasm" ] || { echo "bench: $dist/http_headers.wasm is missing: run scripts/setup.sh" >&2; exit 1; }
if [ -n "${PWHOST:-}" ]; then
  pwhost=$PWHOST
else
  cargo build --release -q -p pwhost --features "wasmtime wamr v8 null serve"
  pwhost=$PWD/target/release/pwhost
fi
BEFORE=${BEFORE:-}
SYSTEM_ALLOCATOR=${SYSTEM_ALLOCATOR:-0}
if [ "$SYSTEM_ALLOCATOR" = 1 ]; then
  # The same proxy without mimalloc (pwhost's default allocator), in a target dir of its own.
  cargo build --release -q -p pwhost --no-default-features --features "wasmtime serve" \
    --target-dir target/system-allocator
  pwhost_system=$PWD/target/system-allocator/release/pwhost
fi

work=$(mktemp -d)
origin_port=$(free_port)
proxy_port=$(free_port)
proxy_pid=
cleanup() {
  [ -n "$proxy_pid" ] && kill -9 "$proxy_pid" 2>/dev/null || true
  for pid in "$work"/*/nginx.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The origin: nginx answering every request with a small body.
start_origin "$work/origin" "$origin_port"

# nginx as the reverse proxy to compare with, keeping upstream connections alive as Pingora does.
mkdir -p "$work/nginx-proxy"
cat > "$work/nginx-proxy/nginx.conf" <<EOF
worker_processes $WORKERS;
pid $work/nginx-proxy/nginx.pid;
error_log $work/nginx-proxy/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  upstream origin { server 127.0.0.1:$origin_port; keepalive 64; }
  server {
    listen 127.0.0.1:$proxy_port;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF

# One pwhost configuration per case: plugin (or none) and runtime.
serve_config() { # name plugin|none runtime
  local filters=""
  if [ "$2" != none ]; then
    local code="{local: {filename: $dist/$2.wasm}}"
    [ "$3" = null ] && code="{local: {inline_string: $2}}"
    filters="    http_filters:
      - name: $2
        vm_config: {vm_id: $2, runtime: \"$3\", code: $code}"
  fi
  cat > "$work/$1.yaml" <<EOF
workers: $WORKERS
listeners:
  - address: 127.0.0.1:$proxy_port
    routes: [{cluster: origin}]
$filters
clusters:
  origin: {endpoints: [127.0.0.1:$origin_port]}
EOF
}

wait_for_proxy() {
  for _ in $(seq 300); do
    curl -s -o /dev/null "http://127.0.0.1:$proxy_port/" && return
    sleep 0.1
  done
  echo "bench: the proxy ($1) did not start" >&2
  cat "$work/$1.log" >&2 || true
  exit 1
}

start() { # case
  case $1 in
    nginx)
      nginx -c "$work/nginx-proxy/nginx.conf" -p "$work/nginx-proxy"
      proxy_pid=
      ;;
    *-sysalloc)
      RUST_LOG=warn "$pwhost_system" serve --config "$work/${1%-sysalloc}.yaml" --deadline-ms 1000 > "$work/$1.log" 2>&1 &
      proxy_pid=$!
      ;;
    *-before)
      RUST_LOG=warn "$BEFORE" serve --config "$work/${1%-before}.yaml" --deadline-ms 1000 > "$work/$1.log" 2>&1 &
      proxy_pid=$!
      ;;
    *)
      RUST_LOG=warn "$pwhost" serve --config "$work/$1.yaml" --deadline-ms 1000 > "$work/$1.log" 2>&1 &
      proxy_pid=$!
      ;;
  esac
  wait_for_proxy "$1"
}

# The proxy's CPU time so far in clock ticks (user + system), "-" for nginx.
cpu_ticks() {
  if [ -n "$proxy_pid" ]; then awk '{print $14 + $15}' "/proc/$proxy_pid/stat"; else echo -; fi
}

stop() { # case
  if [ "$1" = nginx ]; then
    kill "$(cat "$work/nginx-proxy/nginx.pid")" 2>/dev/null || true
    while [ -f "$work/nginx-proxy/nginx.pid" ]; do sleep 0.1; done
  else
    kill -TERM "$proxy_pid" 2>/dev/null || true
    wait "$proxy_pid" 2>/dev/null || true
    proxy_pid=
  fi
  # The port is free again before the next case starts.
  while curl -s -o /dev/null "http://127.0.0.1:$proxy_port/"; do sleep 0.1; done
}

read -r -a cases <<<"${CASES:-none headers-wasmtime headers-wamr headers-v8 headers-null bench-wasmtime bench-null body-wasmtime nginx}"
[ "$SYSTEM_ALLOCATOR" = 1 ] && cases+=(none-sysalloc bench-wasmtime-sysalloc)
if [ -n "$BEFORE" ]; then
  for case in "${cases[@]}"; do
    if [ "$case" != nginx ]; then cases+=("$case-before"); fi
  done
fi
serve_config none none none
serve_config headers-wasmtime http_headers wasmtime
serve_config headers-wamr http_headers wamr
serve_config headers-v8 http_headers v8
serve_config headers-null http_headers null
serve_config bench-wasmtime lifecycle_bench wasmtime
serve_config bench-null lifecycle_bench null
serve_config body-wasmtime body_rewrite wasmtime
results=$work/results
: > "$results"
for round in $(seq "$ROUNDS"); do
  for case in "${cases[@]}"; do
    echo "bench: round $round/$ROUNDS, $WORKERS worker(s), $case" >&2
    start "$case"
    wrk -t1 -c "$CONNECTIONS" -d 2s "http://127.0.0.1:$proxy_port/" > /dev/null # warm-up
    cpu_before=$(cpu_ticks)
    out=$(wrk -t1 -c "$CONNECTIONS" -d "$DURATION" --latency "http://127.0.0.1:$proxy_port/")
    cpu_after=$(cpu_ticks)
    stop "$case"
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    [ -n "$errors" ] && echo "bench: $case: $errors" >&2
    count=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v a="$cpu_before" -v b="$cpu_after" -v n="$count" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { if (a == "-" || n == 0) print "-"; else printf "%.1f", (b - a) / hz * 1e6 / n }')
    echo "$case $rps $p50 $p99 $cpu" >> "$results"
  done
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
base=$(awk '$1 == "none" {print $2}' "$results" | median)
echo "| case ($WORKERS worker(s)) | requests/s | vs pwhost serve alone | p50 ms | p99 ms | proxy CPU µs/request |"
echo "|---|---|---|---|---|---|"
for case in "${cases[@]}"; do
  rps=$(awk -v c="$case" '$1 == c {print $2}' "$results" | median)
  p50=$(awk -v c="$case" '$1 == c {print $3}' "$results" | median)
  p99=$(awk -v c="$case" '$1 == c {print $4}' "$results" | median)
  cpu=-
  [ "$case" != nginx ] && cpu=$(awk -v c="$case" '$1 == c {print $5}' "$results" | median)
  ratio=$(awk -v a="$rps" -v b="$base" 'BEGIN {if (b == "" || b == 0) print "-"; else printf "%.3f", a / b}')
  echo "| $case | $rps | $ratio | $p50 | $p99 | $cpu |"
done

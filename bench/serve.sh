#!/usr/bin/env bash
# Requests/s and latency through `pwhost serve` with no plugin, with the corpus's http_headers
# plugin (Rust SDK) on every engine (wasmtime, the three wasmer compilers, wasmi, WAMR, V8, and
# the null runtime with the same plugin compiled in), with lifecycle_bench (the benchmark plugin
# of `pwhost bench` and criterion: ten header reads, one header added, one log line) on wasmtime
# and the null runtime, and with body_rewrite on wasmtime; through Pingora alone (the framework
# `pwhost serve` is built on, set up the same way: serve/examples/pingora_floor.rs); and through
# nginx as a reverse proxy to the same origin, with the same number of workers. Clients speak HTTP/1.1 (wrk) or, with
# PROTOCOL=h2c, HTTP/2 without TLS (h2load, prior knowledge; nginx then listens with `http2`).
# On loopback against an nginx origin; every run bounded in time; configurations alternated
# round by round so that a busy machine affects them alike. Prints a Markdown table (medians
# over the rounds; ratios to `pwhost serve` without plugins; the proxy process's CPU time per
# request, user and system, for the pwhost cases).
#
#   bash bench/serve.sh            # ROUNDS=3 DURATION=10s CONNECTIONS=32 WORKERS=1 PROTOCOL=http1
#   PROTOCOL=h2c STREAMS=1 bash bench/serve.sh   # HTTP/2 clients: CONNECTIONS connections with
#                                                # STREAMS concurrent streams each
#   SYSTEM_ALLOCATOR=1 bash bench/serve.sh   # also a build on the system allocator (cases
#                                            # none-sysalloc, bench-wasmtime-sysalloc)
#   CASES="none headers-wasmtime" PWHOST=new/pwhost BEFORE=old/pwhost bash bench/serve.sh
#       # only these cases, with a pwhost binary built elsewhere (no build of it here; it must
#       # have the cases' runtimes), each also as CASE-before with the binary BEFORE: two
#       # builds compared in one run
#   PINGORA_FLOOR=path/pingora_floor bash bench/serve.sh   # the `pingora` case's binary, built
#       # elsewhere (default: `--example pingora_floor` of pwhost-serve, built here when the
#       # cases include `pingora`)
#
# Needs wrk, h2load and nginx (apt-get install wrk nghttp2-client nginx) and the plugin corpus
# (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
WORKERS=${WORKERS:-1}
PROTOCOL=${PROTOCOL:-http1}
STREAMS=${STREAMS:-1}
case $PROTOCOL in
  http1) client=wrk curl_protocol=--http1.1 listen_http2= ;;
  h2c) client=h2load curl_protocol=--http2-prior-knowledge listen_http2=" http2" ;;
  *) echo "bench: PROTOCOL is http1 or h2c, not $PROTOCOL" >&2; exit 1 ;;
esac
for tool in "$client" nginx; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install wrk nghttp2-client nginx)" >&2; exit 1; }
done
dist=$PWD/plugins/dist/rust
[ -f "$dist/http_headers.wasm" ] || { echo "bench: $dist/http_headers.wasm is missing: run scripts/setup.sh" >&2; exit 1; }
if [ -n "${PWHOST:-}" ]; then
  pwhost=$PWHOST
else
  cargo build --release -q -p pwhost --features "all-engines serve"
  pwhost=$PWD/target/release/pwhost
fi
DEFAULT_CASES="none headers-wasmtime headers-wasmer-cranelift headers-wasmer-singlepass headers-wasmer-llvm headers-wasmi headers-wamr headers-v8 headers-null bench-wasmtime bench-null body-wasmtime pingora nginx"
read -r -a cases <<<"${CASES:-$DEFAULT_CASES}"
pingora_floor=
if [[ " ${cases[*]} " == *" pingora "* ]]; then
  if [ -n "${PINGORA_FLOOR:-}" ]; then
    pingora_floor=$PINGORA_FLOOR
  else
    cargo build --release -q -p pwhost-serve --example pingora_floor
    pingora_floor=$PWD/target/release/examples/pingora_floor
  fi
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
  # nginx closes a client connection after 1000 requests by default (an HTTP/2 one with
  # GOAWAY, which h2load does not reconnect after); pwhost serve sets no such cap.
  keepalive_requests 1000000;
  upstream origin { server 127.0.0.1:$origin_port; keepalive 64; }
  server {
    listen 127.0.0.1:$proxy_port$listen_http2;
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
    curl -s "$curl_protocol" -o /dev/null "http://127.0.0.1:$proxy_port/" && return
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
    pingora)
      "$pingora_floor" --listen "127.0.0.1:$proxy_port" --upstream "127.0.0.1:$origin_port" \
        --workers "$WORKERS" > "$work/$1.log" 2>&1 &
      proxy_pid=$!
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
  while curl -s "$curl_protocol" -o /dev/null "http://127.0.0.1:$proxy_port/"; do sleep 0.1; done
}

[ "$SYSTEM_ALLOCATOR" = 1 ] && cases+=(none-sysalloc bench-wasmtime-sysalloc)
if [ -n "$BEFORE" ]; then
  for case in "${cases[@]}"; do
    case $case in nginx | pingora) ;; *) cases+=("$case-before") ;; esac
  done
fi
serve_config none none none
serve_config headers-wasmtime http_headers wasmtime
serve_config headers-wasmer-cranelift http_headers wasmer-cranelift
serve_config headers-wasmer-singlepass http_headers wasmer-singlepass
serve_config headers-wasmer-llvm http_headers wasmer-llvm
serve_config headers-wasmi http_headers wasmi
serve_config headers-wamr http_headers wamr
serve_config headers-v8 http_headers v8
serve_config headers-null http_headers null
serve_config bench-wasmtime lifecycle_bench wasmtime
serve_config bench-null lifecycle_bench null
serve_config body-wasmtime body_rewrite wasmtime
# load DURATION: one bounded run of the client against the proxy, its report on stdout (h2load's
# followed by its per-request log, which has the latencies h2load does not summarise).
load() {
  if [ "$client" = wrk ]; then
    wrk -t1 -c "$CONNECTIONS" -d "$1" --latency "http://127.0.0.1:$proxy_port/"
  else
    rm -f "$work/h2load.log"
    h2load -t1 -c "$CONNECTIONS" -m "$STREAMS" -D "$1" --log-file="$work/h2load.log" \
      "http://127.0.0.1:$proxy_port/"
    echo "== per request"
    cat "$work/h2load.log"
  fi
}

# summary: "requests/s p50-ms p99-ms requests failed" from load's report on stdin.
summary() {
  if [ "$client" = wrk ]; then
    local out rps p50 p99 count errors
    out=$(cat)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    count=$(awk '/requests in/ {print $1}' <<<"$out")
    errors=$(awk '
      /Non-2xx or 3xx responses/ { n += $NF }
      /Socket errors/ { for (i = 3; i <= NF; i++) { v = $i; sub(/,$/, "", v); if (v ~ /^[0-9]+$/) n += v } }
      END { print n + 0 }' <<<"$out")
    echo "$rps $p50 $p99 $count $errors"
  else
    # The report's "finished in ..., N req/s" and "requests: ... succeeded, F failed, ..."
    # (failed: not 2xx, or no answer); then one line per request: start time, status,
    # microseconds.
    local out rps errors latencies count p50 p99
    out=$(cat)
    rps=$(awk '/^finished in/ {print $4 + 0}' <<<"$out")
    errors=$(awk '/^requests:/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^failed/) n += $i }
      END { print n + 0 }' <<<"$out")
    latencies=$(awk '/^== per request/ { inlog = 1; next } inlog && NF == 3 { print $3 / 1000 }' <<<"$out" | sort -g)
    count=$(grep -c . <<<"$latencies" || true)
    p50=$(awk -v n="$count" 'NR == int((n - 1) * 0.50) + 1' <<<"$latencies")
    p99=$(awk -v n="$count" 'NR == int((n - 1) * 0.99) + 1' <<<"$latencies")
    echo "$rps ${p50:-0} ${p99:-0} $count $errors"
  fi
}

results=$work/results
: > "$results"
for round in $(seq "$ROUNDS"); do
  for case in "${cases[@]}"; do
    echo "bench: round $round/$ROUNDS, $WORKERS worker(s), $case" >&2
    start "$case"
    load 2s > /dev/null # warm-up
    cpu_before=$(cpu_ticks)
    out=$(load "$DURATION")
    cpu_after=$(cpu_ticks)
    stop "$case"
    read -r rps p50 p99 count errors <<<"$(summary <<<"$out")"
    [ "$errors" != 0 ] && echo "bench: $case: $errors requests failed or were not 2xx" >&2
    cpu=$(awk -v a="$cpu_before" -v b="$cpu_after" -v n="$count" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { if (a == "-" || n == 0) print "-"; else printf "%.1f", (b - a) / hz * 1e6 / n }')
    echo "$case $rps $p50 $p99 $cpu" >> "$results"
  done
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
base=$(awk '$1 == "none" {print $2}' "$results" | median)
echo "| case ($WORKERS worker(s), $PROTOCOL) | requests/s | vs pwhost serve alone | p50 ms | p99 ms | proxy CPU µs/request |"
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

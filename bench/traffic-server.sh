#!/usr/bin/env bash
# Requests/s and latency through Traffic Server 9.2 with no plugin, with the native floor
# (bench/ats-floor/floor.c: the same header and body work in C on Traffic Server's API, no VM),
# and with the corpus's http_headers plugin (Rust SDK) in pwhost_ats.so on wasmtime, WAMR and
# V8, at 1 and 2 net threads: wrk on loopback against an nginx origin, every run bounded in
# time, configurations alternated round by round so that a busy machine affects them alike.
# Prints a Markdown table (medians over the rounds): ratios to "no plugin" at the same thread
# count, each plugin's time per request beyond Traffic Server alone (its CPU time at one net
# thread, where Traffic Server is out of CPU), and that time against the floor's.
#
#   bash bench/traffic-server.sh            # ROUNDS=3 DURATION=10s CONNECTIONS=32
#
# Needs trafficserver, trafficserver-dev, wrk, nginx, a C compiler (cc, else the clang-19 of
# scripts/setup.sh; CC=... to choose) and the plugin corpus (scripts/setup.sh); nginx is the one
# scripts/setup.sh leaves out (apt-get install nginx).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
CC=${CC:-$(command -v cc || command -v clang-19 || echo cc)}
for tool in traffic_server wrk nginx "$CC"; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install trafficserver trafficserver-dev wrk nginx gcc)" >&2; exit 1; }
done
plugin_wasm=$PWD/plugins/dist/rust/http_headers.wasm
[ -f "$plugin_wasm" ] || { echo "bench: $plugin_wasm is missing: run scripts/setup.sh" >&2; exit 1; }
cargo build --release -q -p pwhost-ats --features "wasmtime wamr v8"
library=$PWD/target/release/libpwhost_ats.so

work=$(mktemp -d)
floor=$work/floor.so
"$CC" -O2 -Wall -Wextra -Werror -shared -fPIC -o "$floor" bench/ats-floor/floor.c
origin_port=$(free_port)
proxy_port=$(free_port)
ts_pid=
cleanup() {
  [ -n "$ts_pid" ] && kill -9 -- "-$ts_pid" 2>/dev/null || true
  [ -f "$work/nginx/nginx.pid" ] && kill "$(cat "$work/nginx/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The origin: nginx answering every request with a small body.
start_origin "$work/nginx" "$origin_port"

# One run root per configuration: TS's files in $work/<name>/.
make_root() { # name threads runtime|none
  local dir=$work/$1
  mkdir -p "$dir"/{etc,log,run,cache}
  cat > "$dir/runroot.yaml" <<EOF
prefix: $dir
exec_prefix: /usr
bindir: /usr/bin
sbindir: /usr/sbin
sysconfdir: $dir/etc
datadir: $dir/cache
includedir: /usr/include
libdir: /usr/lib/trafficserver
libexecdir: /usr/lib/trafficserver/modules
localstatedir: $dir/run
runtimedir: $dir/run
logdir: $dir/log
cachedir: $dir/cache
EOF
  cat > "$dir/etc/records.config" <<EOF
CONFIG proxy.config.admin.user_id STRING #-1
CONFIG proxy.config.http.server_ports STRING $proxy_port:ip-in=127.0.0.1
CONFIG proxy.config.exec_thread.autoconfig INT 0
CONFIG proxy.config.exec_thread.limit INT $2
CONFIG proxy.config.accept_threads INT 0
CONFIG proxy.config.task_threads INT 1
CONFIG proxy.config.http.cache.http INT 0
CONFIG proxy.config.cache.ram_cache.size INT 0
CONFIG proxy.config.url_remap.remap_required INT 1
CONFIG proxy.config.reverse_proxy.enabled INT 1
CONFIG proxy.config.log.logging_enabled INT 0
CONFIG proxy.config.diags.debug.enabled INT 0
EOF
  echo "map / http://127.0.0.1:$origin_port/" > "$dir/etc/remap.config"
  cp /etc/trafficserver/ip_allow.yaml "$dir/etc/"
  touch "$dir/etc/"{storage.config,logging.yaml,cache.config,hosting.config}
  if [ "$3" = none ]; then
    : > "$dir/etc/plugin.config"
  elif [ "$3" = floor ]; then
    echo "$floor" > "$dir/etc/plugin.config"
  else
    cat > "$dir/etc/headers.yaml" <<EOF
config:
  name: http_headers
  vmConfig:
    vmId: http_headers
    runtime: ats.wasm.runtime.$3
    code:
      local:
        filename: $plugin_wasm
EOF
    echo "$library headers.yaml" > "$dir/etc/plugin.config"
  fi
}

start_ts() { # name
  local dir=$work/$1
  rm -f "$dir"/log/* "$dir"/run/*
  setsid traffic_server --run-root="$dir" > "$dir/log/stdout" 2>&1 &
  ts_pid=$!
  for _ in $(seq 300); do
    if grep -q "traffic server running" "$dir/log/diags.log" 2>/dev/null &&
      curl -s -o /dev/null "http://127.0.0.1:$proxy_port/"; then
      return
    fi
    sleep 0.1
  done
  echo "bench: Traffic Server ($1) did not start:" >&2
  cat "$dir/log/diags.log" "$dir/log/stdout" >&2
  exit 1
}

stop_ts() {
  kill -9 -- "-$ts_pid" 2>/dev/null || true
  wait "$ts_pid" 2>/dev/null || true
  ts_pid=
}

configs=(none floor wasmtime wamr v8)
for threads in 1 2; do
  for config in "${configs[@]}"; do make_root "$config-$threads" "$threads" "$config"; done
done
results=$work/results
: > "$results"
for round in $(seq "$ROUNDS"); do
  for threads in 1 2; do
    for config in "${configs[@]}"; do
      name=$config-$threads
      echo "bench: round $round/$ROUNDS, $threads net thread(s), $config" >&2
      start_ts "$name"
      wrk -t1 -c "$CONNECTIONS" -d 2s "http://127.0.0.1:$proxy_port/" > /dev/null # warm-up
      out=$(wrk -t1 -c "$CONNECTIONS" -d "$DURATION" --latency "http://127.0.0.1:$proxy_port/")
      stop_ts
      rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
      p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
      p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
      errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
      [ -z "$errors" ] || echo "bench: $name: $errors" >&2
      echo "$threads $config $rps $p50 $p99" >> "$results"
    done
  done
done

echo "| net threads | plugin | requests/s | vs no plugin | µs per request beyond no plugin | ÷ floor's | p50 ms | p99 ms |"
echo "|---|---|---|---|---:|---:|---|---|"
for threads in 1 2; do
  base=
  floor_extra=
  for config in "${configs[@]}"; do
    read -r rps p50 p99 < <(awk -v t="$threads" -v c="$config" '$1 == t && $2 == c {print $3, $4, $5}' "$results" |
      sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}')
    [ -n "$base" ] || base=$rps
    label=$config
    [ "$config" = none ] && label="none (Traffic Server alone)"
    [ "$config" = floor ] && label="floor (C, no VM)"
    ratio=$(awk -v a="$rps" -v b="$base" 'BEGIN {printf "%.3f", a / b}')
    # Time per request beyond Traffic Server alone, from the request rates (the server is out
    # of CPU in every configuration at one net thread, so this is its CPU time per request).
    extra=$(awk -v a="$rps" -v b="$base" 'BEGIN {printf "%.1f", 1e6 / a - 1e6 / b}')
    [ "$config" = floor ] && floor_extra=$extra
    versus=—
    if [ "$config" != none ] && [ "$config" != floor ] && [ -n "$floor_extra" ]; then
      versus=$(awk -v a="$extra" -v b="$floor_extra" 'BEGIN {printf "%.2f", a / b}')
    fi
    [ "$config" = none ] && extra=—
    echo "| $threads | $label | $rps | $ratio | $extra | $versus | $p50 | $p99 |"
  done
done

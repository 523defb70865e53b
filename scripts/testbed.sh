#!/usr/bin/env bash
# The tarn test bed: a registry, containerd and tarn-snapshotter started on
# loopback with every file (configs, data, logs, sockets, pid files) under one
# directory, so several test beds can run side by side and one `down` removes
# all trace of one.
#
#   testbed.sh up DIR [--registry] [--containerd] [--tarn] [--all]
#   testbed.sh down DIR
#   testbed.sh status DIR
#
# The registry is anonymous unless one of these is set:
#   TESTBED_REGISTRY_HTPASSWD=FILE     basic auth for the users of FILE (bcrypt)
#   TESTBED_REGISTRY_TOKEN_USERS=FILE  token auth: a token server of the bed's
#                                      own (scripts/tokenserver.py) issues
#                                      tokens to FILE's `user:password` lines,
#                                      valid TESTBED_TOKEN_TTL seconds (5)
#
# `up` writes DIR/env (shell-sourceable). `down` stops only the processes
# whose pids DIR names (never anything by name) and unmounts everything
# mounted under DIR.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Debian's python: the one on PATH may be a pyenv build without Debian modules.
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3
START_TIMEOUT="${TESTBED_START_TIMEOUT:-30}"
STOP_TIMEOUT="${TESTBED_STOP_TIMEOUT:-10}"

log() { echo "testbed: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: testbed.sh up DIR [--registry] [--containerd] [--tarn] [--all]
       testbed.sh down DIR
       testbed.sh status DIR
EOF
  exit 2
}

# A loopback port nobody listens on right now. Another process may take it
# before we bind it, so callers retry on a failed start.
free_port() {
  "$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# env_set KEY VALUE: record one variable in DIR/env, quoted for the shell.
env_set() {
  printf '%s=%q\n' "$1" "$2" >>"$DIR/env"
}

# Start a command in the background, its stdout and stderr into LOG, its
# pid into DIR/NAME.pid. setsid puts it in its own session so a Ctrl-C on the
# caller's terminal does not reach it before `down` does. Descriptor 9 (the
# image cache lock of images.sh) is not passed on: a daemon holding it would
# hold the lock for its whole life.
spawn() {
  local name="$1" logfile="$2"
  shift 2
  setsid "$@" </dev/null >>"$logfile" 2>&1 9>&- &
  echo "$!" >"$DIR/$name.pid"
}

pid_of() {
  local f="$DIR/$1.pid"
  [ -f "$f" ] && cat "$f"
}

# A zombie is not alive: its parent (when not us) may be slow to reap it.
alive() {
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != Z ]
}

# wait_for NAME LOG CMD...: poll CMD until it succeeds, failing early if the
# process NAME died, or after START_TIMEOUT seconds.
wait_for() {
  local name="$1" logfile="$2"
  shift 2
  local deadline=$((SECONDS + START_TIMEOUT)) pid
  pid="$(pid_of "$name")"
  until "$@" >/dev/null 2>&1; do
    if ! alive "$pid"; then
      log "$name exited during start; last lines of $logfile:"
      tail -n 20 "$logfile" >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$name not ready after ${START_TIMEOUT}s; last lines of $logfile:"
      tail -n 20 "$logfile" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

# ---------------------------------------------------------------- registry

write_registry_config() {
  local port="$1"
  # The JSON "response completed" lines are the access log we parse: one per
  # request, with method, uri, status (206 for ranged GETs) and
  # http.response.written (body bytes sent). Registry 2.8 does not log request
  # headers, so the Range header itself is not available. The combined-format
  # access log is turned off so every request is counted once.
  cat >"$DIR/registry.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: json
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DIR/registry
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
  secret: tarn-testbed
EOF
  # $TESTBED_REGISTRY_HTPASSWD: a registry that demands basic auth of the
  # users in that htpasswd file.
  if [ -n "${TESTBED_REGISTRY_TOKEN_USERS:-}" ]; then
    cat >>"$DIR/registry.yml" <<EOF
auth:
  token:
    realm: http://$TOKEN_SERVER/token
    service: tarn-testbed
    issuer: tarn-testbed-tokens
    rootcertbundle: $DIR/token-cert.pem
EOF
  elif [ -n "${TESTBED_REGISTRY_HTPASSWD:-}" ]; then
    cat >>"$DIR/registry.yml" <<EOF
auth:
  htpasswd:
    realm: tarn-testbed
    path: $TESTBED_REGISTRY_HTPASSWD
EOF
  fi
}

# The token server of a registry with token auth (scripts/tokenserver.py):
# it writes the certificate the registry trusts, then listens.
start_tokenserver() {
  local attempt port
  for attempt in 1 2 3 4 5; do
    port="$(free_port)"
    rm -f "$DIR/token-cert.pem"
    spawn tokenserver "$DIR/tokenserver.log" "$PYTHON" "$REPO_ROOT/scripts/tokenserver.py" \
      --port "$port" --users "$TESTBED_REGISTRY_TOKEN_USERS" --cert "$DIR/token-cert.pem" \
      --ttl "${TESTBED_TOKEN_TTL:-5}" --issuer tarn-testbed-tokens --service tarn-testbed
    # Any answer will do: a request without credentials is a 401.
    if wait_for tokenserver "$DIR/tokenserver.log" curl -sS -o /dev/null "http://127.0.0.1:$port/token" &&
      [ -s "$DIR/token-cert.pem" ]; then
      TOKEN_SERVER="127.0.0.1:$port"
      env_set TOKEN_SERVER "$TOKEN_SERVER"
      env_set TOKEN_SERVER_LOG "$DIR/tokenserver.log"
      log "token server on $TOKEN_SERVER (tokens valid ${TESTBED_TOKEN_TTL:-5}s)"
      return 0
    fi
    stop_pid tokenserver
    log "token server start attempt $attempt failed, retrying on another port"
  done
  die "token server did not start"
}

start_registry() {
  mkdir -p "$DIR/registry"
  local attempt port
  if [ -n "${TESTBED_REGISTRY_TOKEN_USERS:-}" ]; then start_tokenserver; fi
  for attempt in 1 2 3 4 5; do
    port="$(free_port)"
    write_registry_config "$port"
    spawn registry "$DIR/registry.log" docker-registry serve "$DIR/registry.yml"
    # Any HTTP answer will do: /v2/ is a 401 for a registry with auth.
    if wait_for registry "$DIR/registry.log" curl -sS -o /dev/null "http://127.0.0.1:$port/v2/"; then
      REGISTRY="127.0.0.1:$port"
      env_set REGISTRY "$REGISTRY"
      env_set REGISTRY_PID "$(pid_of registry)"
      env_set REGISTRY_LOG "$DIR/registry.log"
      log "registry on $REGISTRY"
      return 0
    fi
    stop_pid registry
    log "registry start attempt $attempt failed, retrying on another port"
  done
  die "registry did not start"
}

# ---------------------------------------------------------------- tarn

# The built binaries are in $TARN_BIN_DIR (default target/release), the one
# place tests, the demo and the benchmark look (integration/src/bins.rs).
TARN_BIN_DIR="${TARN_BIN_DIR:-$REPO_ROOT/target/release}"

tarn_bin() {
  [ -x "$TARN_BIN_DIR/tarn-snapshotter" ] ||
    die "$TARN_BIN_DIR/tarn-snapshotter not found (cargo build --release --workspace, or set TARN_BIN_DIR)"
  echo "$TARN_BIN_DIR/tarn-snapshotter"
}

# The daemon's configuration. Kept in one function because its keys follow
# the daemon as it grows. $TARN_CONFIG_EXTRA (TOML sections other than
# [registry]) is appended, e.g. $'[fetch]\nbackground = true'.
write_tarn_config() {
  {
    echo "# written by scripts/testbed.sh"
    if [ -n "${REGISTRY:-}" ]; then
      echo "[registry]"
      echo "plain_http = [\"$REGISTRY\"]"
    fi
    if [ -n "${TARN_CONFIG_EXTRA:-}" ]; then
      printf '%s\n' "$TARN_CONFIG_EXTRA"
    fi
  } >"$DIR/tarn.toml"
}

start_tarn() {
  local bin
  bin="$(tarn_bin)"
  mkdir -p "$DIR/tarn"
  write_tarn_config
  local args=(--root "$DIR/tarn" --address "$DIR/tarn.sock" --config "$DIR/tarn.toml" --log-level "${TARN_LOG_LEVEL:-debug}")
  # The admin socket flag is passed only when this daemon build knows it.
  if "$bin" --help 2>/dev/null | grep -q -- '--admin-address'; then
    args+=(--admin-address "$DIR/tarn-admin.sock")
  fi
  spawn tarn "$DIR/tarn.log" "$bin" "${args[@]}"
  wait_for tarn "$DIR/tarn.log" test -S "$DIR/tarn.sock" || die "tarn-snapshotter did not start"
  env_set TARN_SOCK "$DIR/tarn.sock"
  env_set TARN_ADMIN_SOCK "$DIR/tarn-admin.sock"
  env_set TARN_ROOT "$DIR/tarn"
  env_set TARN_PID "$(pid_of tarn)"
  env_set TARN_LOG "$DIR/tarn.log"
  log "tarn-snapshotter on $DIR/tarn.sock ($bin)"
}

# ---------------------------------------------------------------- containerd

write_containerd_config() {
  local sandbox="${REGISTRY:-127.0.0.1:1}/busybox:latest"
  mkdir -p "$DIR/containerd/root" "$DIR/containerd/state" "$DIR/containerd/opt" \
    "$DIR/containerd/cni/bin" "$DIR/containerd/cni/conf"
  {
    cat <<EOF
# written by scripts/testbed.sh: nothing here points at system paths
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
# Snapshotters this VM cannot run only add noise to the log.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "$DIR/containerd.sock"

[ttrpc]
  address = "$DIR/containerd.sock.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""

[proxy_plugins.tarn]
  type = "snapshot"
  address = "$DIR/tarn.sock"

# The same daemon under the name tools special-case for lazy pulls.
[proxy_plugins.stargz]
  type = "snapshot"
  address = "$DIR/tarn.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$DIR/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # No CAP_SYS_RESOURCE on this VM.
  restrict_oom_score_adj = true
  sandbox_image = "$sandbox"
  # Port 0: a free port, so two test beds never collide.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "tarn"
    # CRI passes the image ref and layer digests to the snapshotter as labels.
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    # Host-network pods only: no CNI plugin is installed.
    bin_dir = "$DIR/containerd/cni/bin"
    conf_dir = "$DIR/containerd/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    # hosts.toml per registry: the local one is reached over plain HTTP.
    config_path = "$DIR/containerd/certs.d"
EOF
  } >"$DIR/containerd.toml"
  if [ -n "${REGISTRY:-}" ]; then
    mkdir -p "$DIR/containerd/certs.d/$REGISTRY"
    cat >"$DIR/containerd/certs.d/$REGISTRY/hosts.toml" <<EOF
server = "http://$REGISTRY"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve", "push"]
EOF
  fi
}

start_containerd() {
  write_containerd_config
  spawn containerd "$DIR/containerd.log" containerd --config "$DIR/containerd.toml"
  wait_for containerd "$DIR/containerd.log" ctr --address "$DIR/containerd.sock" version ||
    die "containerd did not start"
  env_set CONTAINERD_SOCK "$DIR/containerd.sock"
  env_set CONTAINERD_PID "$(pid_of containerd)"
  env_set CONTAINERD_LOG "$DIR/containerd.log"
  env_set CONTAINERD_STATE "$DIR/containerd/state"
  # For `ctr --hosts-dir`, the same registry hosts CRI uses.
  env_set CONTAINERD_HOSTS_DIR "$DIR/containerd/certs.d"
  log "containerd on $DIR/containerd.sock"
}

# ---------------------------------------------------------------- down

# stop_pid NAME: SIGTERM the process named by DIR/NAME.pid, wait, SIGKILL.
stop_pid() {
  local name="$1" pid
  pid="$(pid_of "$name" || true)"
  if alive "$pid"; then
    kill_and_wait "$pid"
  fi
  rm -f "$DIR/$name.pid"
}

# The holder tarn starts (`[snapshotter] holder`, on by default) keeps the
# lazy mounts' FUSE connections and outlives the daemon by design: stop it by
# the pid it wrote under tarn's root.
stop_holder() {
  local pid
  pid="$(cat "$DIR/tarn/holder.pid" 2>/dev/null || true)"
  if alive "$pid"; then
    kill_and_wait "$pid"
  fi
}

kill_and_wait() {
  local pid="$1" deadline
  kill -TERM "$pid" 2>/dev/null || return 0
  deadline=$((SECONDS + STOP_TIMEOUT))
  while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.1
  done
  if alive "$pid"; then
    log "pid $pid ignored SIGTERM, killing"
    kill -KILL "$pid" 2>/dev/null || true
    # Bounded: a process stuck in the kernel (say, on a dead FUSE mount)
    # dies only once that mount is gone, which comes later.
    deadline=$((SECONDS + STOP_TIMEOUT))
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    alive "$pid" && log "pid $pid survives SIGKILL (blocked in the kernel?)"
  fi
  # Reap it if it is our child (it is not when down runs in a new shell).
  wait "$pid" 2>/dev/null || true
}

# Tasks containerd knows of: ask it to kill and delete them while it still
# runs, so runc's state and cgroups are removed properly.
stop_tasks_gracefully() {
  local sock="$DIR/containerd.sock" ns id
  alive "$(pid_of containerd || true)" || return 0
  [ -S "$sock" ] || return 0
  local ctr=(timeout 10 ctr --address "$sock")
  for ns in $("${ctr[@]}" namespaces ls -q 2>/dev/null || true); do
    for id in $("${ctr[@]}" -n "$ns" tasks ls -q 2>/dev/null || true); do
      "${ctr[@]}" -n "$ns" tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
      "${ctr[@]}" -n "$ns" tasks delete -f "$id" >/dev/null 2>&1 || true
    done
  done
}

# Whatever is left of containers and their shims, found through containerd's
# state dir: each task bundle holds the container's init pid, and a shim runs
# with its bundle as working directory and names our containerd socket on its
# command line.
stop_shims() {
  local taskdir="$DIR/containerd/state/io.containerd.runtime.v2.task" f pid
  [ -d "$taskdir" ] || return 0
  for f in "$taskdir"/*/*/init.pid; do
    [ -f "$f" ] || continue
    pid="$(cat "$f" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    # A container's init is pid 1 in its namespace and ignores SIGTERM
    # unless it handles it.
    if alive "$pid"; then
      log "killing leftover container init $pid ($f)"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for pid in $(shim_pids "$taskdir"); do
    log "stopping leftover shim $pid"
    kill_and_wait "$pid"
  done
  delete_runc_state "$taskdir"
}

# A shim that did not exit cleanly leaves runc's state (and cgroup) behind in
# runc's root, which is a system path (/run/containerd/runc/NAMESPACE): delete
# the containers there whose bundle is one of ours, and only those.
delete_runc_state() {
  local taskdir="$1" bundle ns id root
  for bundle in "$taskdir"/*/*; do
    [ -d "$bundle" ] || continue
    id="$(basename "$bundle")"
    ns="$(basename "$(dirname "$bundle")")"
    root="/run/containerd/runc/$ns"
    [ -d "$root/$id" ] || continue
    if runc --root "$root" state "$id" 2>/dev/null | grep -qF "\"bundle\": \"$bundle\""; then
      log "deleting leftover runc container $ns/$id"
      runc --root "$root" delete -f "$id" >/dev/null 2>&1 || true
    fi
  done
}

shim_pids() {
  "$PYTHON" - "$1" "$DIR/containerd.sock" <<'EOF'
import os, sys
taskdir, sock = sys.argv[1].rstrip("/") + "/", sys.argv[2]
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        continue
    if cwd.startswith(taskdir) and sock.encode() in args:
        print(pid)
EOF
}

# Mount points under DIR, deepest first, with mountinfo's octal escapes
# decoded.
mounts_under() {
  "$PYTHON" - "$1" <<'EOF'
import re, sys
root = sys.argv[1].rstrip("/")
found = []
with open("/proc/self/mountinfo") as f:
    for line in f:
        fields = line.split(" ")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        fstype = line.split(" - ", 1)[1].split(" ")[0]
        if point == root or point.startswith(root + "/"):
            found.append((point, fstype))
found.sort(key=lambda m: m[0].count("/"), reverse=True)
for point, fstype in found:
    print(f"{fstype}\t{point}")
EOF
}

unmount_all() {
  local fstype point
  for _ in 1 2 3; do
    local any=0
    while IFS=$'\t' read -r fstype point; do
      [ -n "$point" ] || continue
      any=1
      case "$fstype" in
        fuse*) fusermount3 -u "$point" 2>/dev/null || umount "$point" 2>/dev/null || true ;;
        *) umount "$point" 2>/dev/null || true ;;
      esac
    done < <(mounts_under "$DIR")
    [ "$any" = 1 ] || return 0
  done
  # Still busy after three passes: detach lazily as a last resort.
  while IFS=$'\t' read -r fstype point; do
    [ -n "$point" ] || continue
    log "lazy unmount of busy $point"
    umount -l "$point" 2>/dev/null || true
  done < <(mounts_under "$DIR")
}

# Detaches the loop devices over files under the bed (overlaybd disks the
# holder kept): while their FUSE file is still mounted, so its path still
# names the bed (a lazily unmounted one reads as "/disk"). One still mounted
# gets autoclear and goes with unmount_all's unmount of its ext4 tree.
detach_loops() {
  local f back
  for f in /sys/block/loop*/loop/backing_file; do
    [ -r "$f" ] || continue
    back="$(cat "$f" 2>/dev/null || true)"
    case "$back" in
      "$DIR"/*) losetup --detach "/dev/$(basename "$(dirname "$(dirname "$f")")")" 2>/dev/null || true ;;
    esac
  done
}

cmd_down() {
  [ -d "$DIR" ] || return 0
  stop_tasks_gracefully
  stop_shims
  # containerd before tarn: containerd may still call the snapshotter while it
  # shuts down; tarn last but one so its FUSE mounts go with it; then the
  # registry.
  stop_pid containerd
  stop_shims
  stop_pid tarn
  stop_holder
  stop_pid registry
  stop_pid tokenserver
  detach_loops
  unmount_all
  local left
  left="$(mounts_under "$DIR")"
  if [ -n "$left" ]; then
    log "still mounted under $DIR:"
    echo "$left" >&2
    return 1
  fi
  log "down: $DIR"
}

# ---------------------------------------------------------------- status

cmd_status() {
  [ -d "$DIR" ] || die "no test bed at $DIR"
  local name pid any=0
  for name in tokenserver registry tarn containerd; do
    pid="$(pid_of "$name" || true)"
    [ -n "$pid" ] || continue
    any=1
    if alive "$pid"; then
      echo "$name: running (pid $pid)"
    else
      echo "$name: dead (pid $pid)"
    fi
  done
  [ "$any" = 1 ] || echo "nothing started"
  [ -f "$DIR/env" ] && sed 's/^/  /' "$DIR/env"
  local m line
  m="$(mounts_under "$DIR")"
  if [ -n "$m" ]; then
    echo "mounts:"
    while IFS= read -r line; do echo "  $line"; done <<<"$m"
  fi
}

# ---------------------------------------------------------------- up

cmd_up() {
  local want_registry=0 want_containerd=0 want_tarn=0
  [ "$#" -gt 0 ] || set -- --all
  for arg in "$@"; do
    case "$arg" in
      --registry) want_registry=1 ;;
      --containerd) want_containerd=1 ;;
      --tarn) want_tarn=1 ;;
      --all) want_registry=1 want_containerd=1 want_tarn=1 ;;
      *) usage ;;
    esac
  done
  if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
    die "$DIR is not empty (run down and remove it first)"
  fi
  mkdir -p "$DIR"
  DIR="$(cd "$DIR" && pwd)"
  : >"$DIR/env"
  env_set TESTBED_DIR "$DIR"
  # A failed or interrupted start leaves nothing running behind it.
  trap 'log "start failed, tearing down"; cmd_down || true' EXIT
  trap 'exit 130' INT TERM
  if [ "$want_registry" = 1 ]; then start_registry; fi
  if [ "$want_tarn" = 1 ]; then start_tarn; fi
  if [ "$want_containerd" = 1 ]; then start_containerd; fi
  trap - EXIT INT TERM
  log "up: source $DIR/env"
}

[ "$#" -ge 2 ] || usage
verb="$1"
DIR="$2"
shift 2
case "$verb" in
  up) cmd_up "$@" ;;
  down)
    DIR="$(cd "$DIR" 2>/dev/null && pwd || echo "$DIR")"
    cmd_down
    ;;
  status) cmd_status ;;
  *) usage ;;
esac

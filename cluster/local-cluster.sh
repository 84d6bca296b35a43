#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: one head node + N worker nodes, each its own `ray start` with its own
# CPU count, ports and temp dir (own raylet, object store and sockets). For trying multi-node behaviour (placement
# across nodes, `ray job submit`, node failures) without a second machine. All nodes share this machine's IP (Ray
# replaces 127.0.0.1 by the machine's address), so tell them apart by node id, not by IP.
#
#   cluster/local-cluster.sh start [N_WORKERS]   # default 2 worker nodes; prints the `ray job submit` line
#   cluster/local-cluster.sh status              # what is running, `ray status` of the cluster
#   cluster/local-cluster.sh stop                # stops exactly the processes this script started
#
# Environment (all optional):
#   CAMKD_CLUSTER_DIR   state + temp dirs (default /tmp/camkd-lc-$UID; keep it short: Ray's unix sockets live below)
#   HEAD_CPUS           logical CPUs of the head node (default 0: the head only coordinates, work goes to workers)
#   WORKER_CPUS         logical CPUs of each worker node (default 2)
#   OBJECT_STORE_MB     object store per node in MiB (default 256)
#   RAY                 the `ray` executable (default: `ray` on PATH, e.g. from the project's .venv)
#
# Security: token authentication is ON (Ray >= 2.59 turns it on for `ray start` when ~/.ray/auth_token exists; this
# script creates the token if missing and sets RAY_AUTH_MODE=token on every node explicitly). The dashboard / job
# server listens on 127.0.0.1 only. The GCS and Ray client ports listen on the machine's address (Ray's behaviour;
# the token guards them): firewall them on a shared network. Clients need RAY_AUTH_MODE=token and the token (same
# machine: ~/.ray/auth_token).
#
# Never run a bare `ray stop` to clean up: it kills every Ray process on the machine, including other people's
# clusters. `stop` here kills only the process sessions recorded in the state file.
set -euo pipefail

STATE_DIR="${CAMKD_CLUSTER_DIR:-/tmp/camkd-lc-$(id -u)}"
STATE_FILE="$STATE_DIR/cluster.env"
HEAD_CPUS="${HEAD_CPUS:-0}"
WORKER_CPUS="${WORKER_CPUS:-2}"
OBJECT_STORE_MB="${OBJECT_STORE_MB:-256}"
RAY="${RAY:-ray}"
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0

die() { echo "local-cluster: $*" >&2; exit 1; }

usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
    exit "${1:-0}"
}

# N free TCP ports on 127.0.0.1, all distinct (kept bound until all are chosen).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# PIDs of every process in a session (the session id is the PID of the `setsid ray start` that created it).
session_pids() {
    ps -eo pid=,sid= | awk -v sid="$1" '$2 == sid {print $1}'
}

alive_sessions() {
    local sid n=0
    for sid in ${SESSIONS:-}; do
        [ -n "$(session_pids "$sid")" ] && n=$((n + 1))
    done
    echo "$n"
}

# Start one node in a new session (setsid) so that all its Ray processes (gcs, raylet, dashboard, workers, ...)
# share one session id that `stop` can find again. Prints the session id.
start_node() {
    local name="$1"; shift
    local log="$STATE_DIR/$name.start.log"
    setsid "$RAY" start "$@" --disable-usage-stats >"$log" 2>&1 &
    local sid=$!
    if ! wait "$sid"; then
        echo "local-cluster: \`ray start\` for $name failed; its output ($log):" >&2
        tail -n 30 "$log" >&2
        SESSIONS="${SESSIONS:-} $sid"
        stop_sessions
        exit 1
    fi
    SESSIONS="${SESSIONS:-} $sid"
}

stop_sessions() {
    local sid pids
    for sig in TERM KILL; do
        for sid in ${SESSIONS:-}; do
            pids="$(session_pids "$sid")"
            [ -n "$pids" ] && kill "-$sig" $pids 2>/dev/null || true
        done
        for _ in $(seq 1 50); do
            [ "$(alive_sessions)" = 0 ] && return 0
            sleep 0.2
        done
    done
    [ "$(alive_sessions)" = 0 ] || echo "local-cluster: some processes survived SIGKILL" >&2
}

write_state() {
    cat >"$STATE_FILE" <<EOF
# written by cluster/local-cluster.sh; \`cluster/local-cluster.sh stop\` reads it
GCS_PORT=$GCS_PORT
GCS_ADDRESS=$GCS_ADDRESS
DASHBOARD_PORT=$DASHBOARD_PORT
CLIENT_PORT=$CLIENT_PORT
NUM_WORKERS=$NUM_WORKERS
SESSIONS="$SESSIONS"
EOF
}

cmd_start() {
    NUM_WORKERS="${1:-2}"
    [[ "$NUM_WORKERS" =~ ^[0-9]+$ ]] || die "N_WORKERS must be a number, got '$NUM_WORKERS'"
    command -v "$RAY" >/dev/null || die "'$RAY' not found; activate the project's venv (. .venv/bin/activate) or set RAY="
    command -v setsid >/dev/null || die "setsid (util-linux) is required"
    if [ -f "$STATE_FILE" ]; then
        # shellcheck disable=SC1090
        . "$STATE_FILE"
        if [ "$(alive_sessions)" != 0 ]; then
            die "a cluster started from $STATE_DIR is running (dashboard 127.0.0.1:$DASHBOARD_PORT); run '$0 stop' first"
        fi
        rm -f "$STATE_FILE"
    fi
    mkdir -p "$STATE_DIR"
    SESSIONS=""

    # A token for this user (no-op when ~/.ray/auth_token exists); every node and client reads it from there.
    "$RAY" get-auth-token --generate >/dev/null 2>&1 || die "could not create the auth token (ray get-auth-token --generate)"

    # Head: GCS, dashboard/job server, client server; ports: gcs dash client nm om agent-http agent-grpc rtenv metrics
    read -r GCS_PORT DASHBOARD_PORT CLIENT_PORT NM OM AH AG RE ME <<<"$(free_ports 9)"
    local obj=$((OBJECT_STORE_MB * 1024 * 1024))
    rm -rf "$STATE_DIR/head"
    start_node head --head --port "$GCS_PORT" \
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
        --ray-client-server-port "$CLIENT_PORT" --node-manager-port "$NM" --object-manager-port "$OM" \
        --dashboard-agent-listen-port "$AH" --dashboard-agent-grpc-port "$AG" --runtime-env-agent-port "$RE" \
        --metrics-export-port "$ME" --min-worker-port 20000 --max-worker-port 20999 \
        --num-cpus "$HEAD_CPUS" --num-gpus 0 --object-store-memory "$obj" --temp-dir "$STATE_DIR/head"
    # The address Ray registered (the machine's IP, not 127.0.0.1): what drivers and worker nodes connect to.
    GCS_ADDRESS="$(cat "$STATE_DIR/head/ray_current_cluster" 2>/dev/null || echo "127.0.0.1:$GCS_PORT")"
    write_state

    local i
    for i in $(seq 1 "$NUM_WORKERS"); do
        read -r NM OM AH AG RE ME <<<"$(free_ports 6)"
        rm -rf "$STATE_DIR/w$i"
        start_node "w$i" --address "127.0.0.1:$GCS_PORT" \
            --node-manager-port "$NM" --object-manager-port "$OM" \
            --dashboard-agent-listen-port "$AH" --dashboard-agent-grpc-port "$AG" --runtime-env-agent-port "$RE" \
            --metrics-export-port "$ME" --min-worker-port $((20000 + 1000 * i)) --max-worker-port $((20999 + 1000 * i)) \
            --num-cpus "$WORKER_CPUS" --num-gpus 0 --object-store-memory "$obj" --temp-dir "$STATE_DIR/w$i"
        write_state
    done

    # Wait until every node has registered (`ray status` needs the token: RAY_AUTH_MODE=token is exported above).
    local want=$((NUM_WORKERS + 1)) have=0
    for _ in $(seq 1 60); do
        have="$("$RAY" list nodes --address "http://127.0.0.1:$DASHBOARD_PORT" --filter "state=ALIVE" --format json 2>/dev/null \
            | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)"
        [ "$have" = "$want" ] && break
        sleep 1
    done
    [ "$have" = "$want" ] || echo "local-cluster: warning: $have of $want nodes registered so far" >&2

    cat <<EOF
Local Ray cluster up: 1 head ($HEAD_CPUS CPU) + $NUM_WORKERS worker node(s) × $WORKER_CPUS CPU
  GCS (ray.init / --address):  $GCS_ADDRESS
  dashboard / job server:      http://127.0.0.1:$DASHBOARD_PORT   (bound to 127.0.0.1 only)
  state + logs:                $STATE_DIR
Token authentication is on; the token is in ~/.ray/auth_token (print it: ray get-auth-token).

Submit from the repository root (the working dir is uploaded; .gitignore'd paths such as .venv are not):
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- python pipeline/run.py quickstart --root /tmp/camkd-runs
Or run a driver here that attaches to it:
  RAY_AUTH_MODE=token python pipeline/run.py all --config configs/quickstart.yaml --set root=/tmp/camkd-runs --address $GCS_ADDRESS
Stop it:
  $0 stop
EOF
}

cmd_stop() {
    [ -f "$STATE_FILE" ] || { echo "local-cluster: nothing to stop (no $STATE_FILE)"; return 0; }
    # shellcheck disable=SC1090
    . "$STATE_FILE"
    local n
    n="$(alive_sessions)"
    stop_sessions
    rm -f "$STATE_FILE"
    echo "local-cluster: stopped $n node(s) started from $STATE_DIR"
}

cmd_status() {
    [ -f "$STATE_FILE" ] || { echo "local-cluster: not running (no $STATE_FILE)"; return 1; }
    # shellcheck disable=SC1090
    . "$STATE_FILE"
    local sid names=(head) i
    for i in $(seq 1 "$NUM_WORKERS"); do names+=("w$i"); done
    i=0
    for sid in $SESSIONS; do
        echo "${names[$i]:-?}: session $sid, $(session_pids "$sid" | wc -l) process(es)"
        i=$((i + 1))
    done
    echo "dashboard / job server: http://127.0.0.1:$DASHBOARD_PORT; GCS: $GCS_ADDRESS"
    [ "$(alive_sessions)" != 0 ] || { echo "local-cluster: no process is alive; run '$0 stop' to clean up"; return 1; }
    "$RAY" status --address "$GCS_ADDRESS" || true
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 ;;
esac

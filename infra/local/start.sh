#!/usr/bin/env bash
# Start a local Ray head and an MLflow tracking server in the background, for development and
# integration tests; stop them with stop.sh (which stops exactly these processes, never others).
#
#   infra/local/start.sh [options]
#   source ~/.local/state/perceiver-local/env.sh     # RAY_ADDRESS, MLFLOW_TRACKING_URI, ...
#   ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/pretrain_tiny.yaml
#   infra/local/stop.sh
#
# Options:
#   --state-dir DIR         PID files, logs, env.sh, the Ray token, MLflow's SQLite database and
#                           artifacts, made readable by its owner only (default:
#                           $PERCEIVER_LOCAL_STATE, else ${XDG_STATE_HOME:-~/.local/state}/perceiver-local)
#   --ray-only | --mlflow-only
#   --ray-port N            GCS port (6379)
#   --dashboard-port N      dashboard and job API, bound to 127.0.0.1 (8265)
#   --ray-client-port N     Ray Client server (10001)
#   --dashboard-agent-port N  the head's dashboard agent HTTP port (52365)
#   --mlflow-port N         MLflow, bound to 127.0.0.1 (5000)
#   --num-cpus N            CPUs the head offers to tasks (default: all)
#   --no-auth               RAY_AUTH_MODE=disabled (see below)
#   --mlflow-auth           MLflow with basic authentication (see below)
#   --timeout SECONDS       how long to wait for each service to answer (120)
#
# Ray authentication. Ray 2.60 uses token authentication by default, and so does this script: it
# generates a token once into $STATE_DIR/ray/auth_token (mode 600) and the printed exports point
# clients at it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH). --no-auth starts the head with
# RAY_AUTH_MODE=disabled, and clients must set RAY_AUTH_MODE=disabled too. Only the dashboard
# (job API) is bound to 127.0.0.1: Ray replaces a loopback --node-ip-address with the machine's
# routable address, and the GCS, raylet and dashboard agent listen on all interfaces, so without
# a token anyone who can reach this machine can run code on it. Use --no-auth only on a machine
# that nothing else can reach (a CI runner, a sandbox).
#
# MLflow runs on 127.0.0.1 only, with an SQLite store and a local artifact folder; its background
# job runner (GenAI scorers) is off to keep it light. Without --mlflow-auth anyone on this machine
# can use it. With --mlflow-auth it runs MLflow's basic-auth app (needs `mlflow[auth]`): an admin
# password is generated once into $STATE_DIR/mlflow/admin_password (mode 600), and the printed
# exports set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

STATE_DIR=$(default_state_dir)
RAY_PORT=6379
DASHBOARD_PORT=8265
CLIENT_PORT=10001
AGENT_PORT=52365
MLFLOW_PORT=5000
NUM_CPUS=""
AUTH_MODE=token
MLFLOW_AUTH=0
TIMEOUT=120
SERVICES="ray mlflow"

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case $1 in
        --state-dir) need_value "$@"; STATE_DIR=$2; shift 2 ;;
        --ray-only) SERVICES=ray; shift ;;
        --mlflow-only) SERVICES=mlflow; shift ;;
        --ray-port) need_value "$@"; RAY_PORT=$2; shift 2 ;;
        --dashboard-port) need_value "$@"; DASHBOARD_PORT=$2; shift 2 ;;
        --ray-client-port) need_value "$@"; CLIENT_PORT=$2; shift 2 ;;
        --dashboard-agent-port) need_value "$@"; AGENT_PORT=$2; shift 2 ;;
        --mlflow-port) need_value "$@"; MLFLOW_PORT=$2; shift 2 ;;
        --num-cpus) need_value "$@"; NUM_CPUS=$2; shift 2 ;;
        --no-auth) AUTH_MODE=disabled; shift ;;
        --mlflow-auth) MLFLOW_AUTH=1; shift ;;
        --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
for value in "$RAY_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$AGENT_PORT" "$MLFLOW_PORT" "$TIMEOUT" ${NUM_CPUS:+"$NUM_CPUS"}; do
    [[ $value =~ ^[0-9]+$ ]] || die "not a number: $value"
done
[ -d /proc/self ] || die "needs Linux (/proc) to track its processes"
command -v setsid >/dev/null || die "setsid not found (util-linux)"
"$PYTHON" -c "import ray, mlflow" 2>/dev/null ||
    die "$PYTHON cannot import ray and mlflow (install the project: pip install -e .)"

# The state folder holds the Ray token and MLflow's store: its owner's only.
(umask 077 && mkdir -p "$STATE_DIR")
chmod 700 "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)

# Refuse to start a service twice; forget a service whose processes are all gone.
for name in $SERVICES; do
    if service_running "$name"; then
        die "$name is already running (pid $(cat "$(pid_file "$name")"), state dir $STATE_DIR); stop it first: $HERE/stop.sh --state-dir $STATE_DIR"
    fi
    if [ -n "$(service_pids "$name")" ]; then
        die "processes of an earlier $name are still alive: $(service_pids "$name" | tr '\n' ' '); run $HERE/stop.sh --state-dir $STATE_DIR"
    fi
    rm -f "$(pid_file "$name")"
done

# Every port must be free on every interface (Ray's GCS binds them all; the dashboard would
# silently move to another port if its own were taken).
check_ports() {
    "$PYTHON" - "$@" <<'EOF'
import socket
import sys

busy = []
for port in map(int, sys.argv[1:]):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            busy.append(str(port))
if len(set(sys.argv[1:])) != len(sys.argv[1:]):
    sys.exit("the same port is given twice: " + " ".join(sys.argv[1:]))
if busy:
    sys.exit("port(s) already in use: " + ", ".join(busy))
EOF
}
PORTS=()
case " $SERVICES " in *" ray "*) PORTS+=("$RAY_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$AGENT_PORT") ;; esac
case " $SERVICES " in *" mlflow "*) PORTS+=("$MLFLOW_PORT") ;; esac
check_ports "${PORTS[@]}" || die "choose other ports (see --help)"

# Wait until URL answers 200 while the service's leader lives. Exit 0 when up, 1 otherwise.
wait_http() { # url, leader pid, token file or ""
    "$PYTHON" - "$1" "$2" "$TIMEOUT" "$3" <<'EOF'
import sys
import time
import urllib.error
import urllib.request

url, pid, timeout, token_file = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
headers = {}
if token_file:
    with open(token_file) as f:
        headers["Authorization"] = "Bearer " + f.read().strip()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                sys.exit(f"process {pid} exited")
    except FileNotFoundError:
        sys.exit(f"process {pid} exited")
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=5) as response:
            if response.status == 200:
                sys.exit(0)
    except (urllib.error.URLError, OSError):
        pass
    time.sleep(0.5)
sys.exit(f"no answer from {url} within {timeout:.0f} s")
EOF
}

# Ray's sockets live under its temp dir and a Unix socket path has at most 107 bytes, so the head
# gets a short temp dir of its own rather than one under the state dir.
RAY_TEMP_DIR="/tmp/perceiver-ray-$(id -u)-$RAY_PORT"

STARTED=()
fail() { # message, log file: show the log, stop what this run started, exit
    echo "$(basename "$0"): $1" >&2
    if [ -f "$2" ]; then
        echo "--- last lines of $2 ---" >&2
        tail -n 30 "$2" >&2
    fi
    for name in "${STARTED[@]}"; do
        stop_service "$name" 10 >/dev/null 2>&1 || true
    done
    write_env_file
    exit 1
}

launch_ray() {
    local dir="$STATE_DIR/ray" token_file=""
    mkdir -p "$dir"
    local -a env_args=(env -u RAY_ADDRESS "PERCEIVER_LOCAL_SERVICE=ray@$STATE_DIR" "RAY_AUTH_MODE=$AUTH_MODE")
    if [ "$AUTH_MODE" = token ]; then
        token_file="$dir/auth_token"
        if [ ! -s "$token_file" ]; then
            (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" >"$token_file")
        fi
        env_args+=("RAY_AUTH_TOKEN_PATH=$token_file")
    fi
    local -a ray_args=(start --head --block --port "$RAY_PORT"
        --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
        --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT"
        --include-dashboard true --temp-dir "$RAY_TEMP_DIR" --disable-usage-stats)
    [ -n "$NUM_CPUS" ] && ray_args+=(--num-cpus "$NUM_CPUS")

    (cd "$dir" && exec "${env_args[@]}" setsid "$PYTHON" -m ray.scripts.scripts "${ray_args[@]}") \
        >"$dir/ray.log" 2>&1 </dev/null &
    STARTED+=(ray)
}

await_ray() {
    local dir="$STATE_DIR/ray" leader token_file=""
    [ "$AUTH_MODE" = token ] && token_file="$dir/auth_token"
    leader=$(find_leader ray)
    [ -n "$leader" ] || fail "the Ray head did not start" "$dir/ray.log"
    echo "$leader" >"$(pid_file ray)"
    wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/jobs/" "$leader" "$token_file" ||
        fail "the Ray head did not come up" "$dir/ray.log"
    {
        echo "# Ray head (pid $leader): dashboard http://127.0.0.1:$DASHBOARD_PORT, logs $RAY_TEMP_DIR/session_latest/logs"
        echo "# The GCS address serves both \`ray job submit\` and ray.init() in a driver."
        echo "export RAY_ADDRESS=127.0.0.1:$RAY_PORT"
        echo "export RAY_AUTH_MODE=$AUTH_MODE"
        if [ -n "$token_file" ]; then
            echo "export RAY_AUTH_TOKEN_PATH=$token_file"
        fi
    } >"$dir/env.sh"
    echo "Ray head:      GCS 127.0.0.1:$RAY_PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT (pid $leader, auth: $AUTH_MODE)"
    echo "               log $dir/ray.log"
}

# Basic authentication: an admin password and the server's secret key, generated once (mode
# 600), and the auth config (users in their own SQLite database) that names them.
prepare_mlflow_auth() {
    local dir=$1
    (
        umask 077
        for name in admin_password secret_key; do
            [ -s "$dir/$name" ] || "$PYTHON" -c "import secrets; print(secrets.token_hex(24))" >"$dir/$name"
        done
        "$PYTHON" - "$dir" <<'EOF'
import pathlib
import sys

folder = pathlib.Path(sys.argv[1])
password = (folder / "admin_password").read_text().strip()
(folder / "basic_auth.ini").write_text(
    "[mlflow]\n"
    "default_permission = READ\n"
    f"database_uri = sqlite:///{folder}/basic_auth.db\n"
    "admin_username = admin\n"
    f"admin_password = {password}\n"
    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
)
EOF
    )
}

launch_mlflow() {
    local dir="$STATE_DIR/mlflow"
    local -a auth_args=()
    mkdir -p "$dir/artifacts"
    if [ "$MLFLOW_AUTH" = 1 ]; then
        "$PYTHON" -c "import flask_wtf" 2>/dev/null ||
            die "--mlflow-auth needs MLflow's auth extra: pip install 'mlflow[auth]' (or the project's dev extra)"
        prepare_mlflow_auth "$dir"
        auth_args=(--app-name basic-auth)
    fi
    # The secret key goes through the environment, never a command line.
    (cd "$dir" &&
        if [ "$MLFLOW_AUTH" = 1 ]; then
            MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/secret_key")
            export MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini"
        fi &&
        exec env "PERCEIVER_LOCAL_SERVICE=mlflow@$STATE_DIR" \
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
            setsid "$PYTHON" -m mlflow server \
            --backend-store-uri "sqlite:///$dir/mlflow.db" \
            --artifacts-destination "$dir/artifacts" \
            --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 ${auth_args[@]+"${auth_args[@]}"}) \
        >"$dir/mlflow.log" 2>&1 </dev/null &
    STARTED+=(mlflow)
}

await_mlflow() {
    local dir="$STATE_DIR/mlflow" leader
    leader=$(find_leader mlflow)
    [ -n "$leader" ] || fail "the MLflow server did not start" "$dir/mlflow.log"
    echo "$leader" >"$(pid_file mlflow)"
    wait_http "http://127.0.0.1:$MLFLOW_PORT/health" "$leader" "" ||
        fail "the MLflow server did not come up" "$dir/mlflow.log"
    {
        echo "# MLflow server (pid $leader), store $dir"
        echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
        if [ "$MLFLOW_AUTH" = 1 ]; then
            echo "export MLFLOW_TRACKING_USERNAME=admin"
            # Read when sourced: the password itself is never printed.
            echo "export MLFLOW_TRACKING_PASSWORD=\"\$(cat '$dir/admin_password')\""
        fi
    } >"$dir/env.sh"
    echo "MLflow server: http://127.0.0.1:$MLFLOW_PORT (pid $leader)"
    echo "               log $dir/mlflow.log"
}

# Start both, then wait for both: they come up in parallel.
for name in $SERVICES; do
    "launch_$name"
done
for name in $SERVICES; do
    "await_$name"
done
write_env_file

echo
echo "Use them from a shell with:"
echo "  source $STATE_DIR/env.sh"
grep '^export' "$STATE_DIR/env.sh" | sed 's/^/    /'
echo "Stop them with:"
echo "  $HERE/stop.sh --state-dir $STATE_DIR"

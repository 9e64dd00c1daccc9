# shellcheck shell=bash
# Shared by start.sh and stop.sh: where state lives, and which processes are ours.
#
# How a service's processes are found again. Each service is started with `setsid`, so its first
# process leads a new session and everything it forks stays in that session unless it asks for a
# new one; each service also gets PERCEIVER_LOCAL_SERVICE=<name>@<state dir> in its environment,
# which every child inherits. Ray needs both: its job supervisor starts job drivers in sessions of
# their own (they keep the variable), and processes that rename themselves with setproctitle
# (dashboard modules, ray:: workers) overwrite their environment as /proc shows it (they keep the
# session). A process is ours if it is in the leader's session or carries the exact marker; we
# never match by name, so other Ray or MLflow processes on the machine are left alone.
# Linux only: it reads /proc.

PYTHON=${PYTHON:-python3}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

# The default state folder, unless --state-dir or PERCEIVER_LOCAL_STATE says otherwise.
default_state_dir() {
    echo "${PERCEIVER_LOCAL_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/perceiver-local}"
}

marker() { # service name -> the environment entry that tags its processes
    echo "PERCEIVER_LOCAL_SERVICE=$1@$STATE_DIR"
}

pid_file() { echo "$STATE_DIR/$1/pid"; }

# This script and its ancestors: never signalled, even if they inherited a marker (stop.sh run
# from inside a Ray job, say).
self_and_ancestors() {
    local pid=$$
    while [ -n "$pid" ] && [ "$pid" -gt 1 ]; do
        echo "$pid"
        pid=$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    done
}

# PIDs of the processes that belong to service $1, one per line.
service_pids() {
    local name=$1 leader="" sid
    if [ -f "$(pid_file "$name")" ]; then
        leader=$(cat "$(pid_file "$name")")
    fi
    {
        # Session members: only if the recorded leader still leads a session carrying our marker
        # (a reused PID must not make us adopt someone else's session).
        if [ -n "$leader" ] && [ -r "/proc/$leader/environ" ] &&
            grep -qzxF "$(marker "$name")" "/proc/$leader/environ" 2>/dev/null; then
            sid=$(ps -o sid= -p "$leader" | tr -d ' ')
            if [ "$sid" = "$leader" ]; then
                # Zombies are skipped: they are already dead, only waiting to be reaped.
                ps -e -o pid=,sid=,stat= | awk -v sid="$sid" '$2 == sid && $3 !~ /^Z/ {print $1}'
            fi
        fi
        # Marked processes, wherever they are.
        grep -lzxF "$(marker "$name")" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
    } | sort -un | grep -vxF -f <(self_and_ancestors) || true
}

# Whether service $1's recorded leader is alive and ours.
service_running() {
    local name=$1 leader
    [ -f "$(pid_file "$name")" ] || return 1
    leader=$(cat "$(pid_file "$name")")
    [ -n "$leader" ] && [ -r "/proc/$leader/environ" ] &&
        grep -qzxF "$(marker "$name")" "/proc/$leader/environ" 2>/dev/null
}

# The session leader among the processes that carry service $1's marker (setsid may or may not
# have forked, so $! is not trusted). Prints nothing if none appears within 10 s.
find_leader() {
    local name=$1 pid _
    for _ in $(seq 1 50); do
        while read -r pid; do
            if [ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ]; then
                echo "$pid"
                return 0
            fi
        done < <(grep -lzxF "$(marker "$name")" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3)
        sleep 0.2
    done
}

# Stop service $1: SIGTERM to its leader (Ray drains and stops its children; MLflow stops its
# workers), then SIGTERM to whatever of ours is left, then SIGKILL. Waits until all are gone.
stop_service() {
    local name=$1 grace=${2:-15} leader pids _
    pids=$(service_pids "$name")
    if [ -z "$pids" ]; then
        rm -f "$(pid_file "$name")" "$STATE_DIR/$name/env.sh"
        return 1
    fi
    if service_running "$name"; then
        leader=$(cat "$(pid_file "$name")")
        kill -TERM "$leader" 2>/dev/null || true
        wait_until_gone "$name" "$grace" && { finish_stop "$name"; return 0; }
    fi
    # shellcheck disable=SC2046 # one PID per word
    kill -TERM $(service_pids "$name") 2>/dev/null || true
    wait_until_gone "$name" 5 && { finish_stop "$name"; return 0; }
    # shellcheck disable=SC2046
    kill -KILL $(service_pids "$name") 2>/dev/null || true
    wait_until_gone "$name" 5 && { finish_stop "$name"; return 0; }
    echo "$name: processes still alive after SIGKILL: $(service_pids "$name" | tr '\n' ' ')" >&2
    return 2
}

wait_until_gone() { # service, seconds
    local name=$1 seconds=$2 _
    for _ in $(seq 1 $((seconds * 5))); do
        [ -z "$(service_pids "$name")" ] && return 0
        sleep 0.2
    done
    [ -z "$(service_pids "$name")" ]
}

finish_stop() {
    rm -f "$(pid_file "$1")" "$STATE_DIR/$1/env.sh"
}

# $STATE_DIR/env.sh: the exports of the services that are running now.
write_env_file() {
    local out="$STATE_DIR/env.sh" name
    {
        echo "# Written by infra/local/start.sh: source it to use the local services."
        for name in ray mlflow; do
            if service_running "$name" && [ -f "$STATE_DIR/$name/env.sh" ]; then
                cat "$STATE_DIR/$name/env.sh"
            fi
        done
    } >"$out"
}

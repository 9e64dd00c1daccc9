#!/usr/bin/env bash
# Stop the Ray head and the MLflow server that start.sh started from the same state dir.
#
#   infra/local/stop.sh [--state-dir DIR] [--ray-only | --mlflow-only] [--grace SECONDS]
#
# It signals only processes that belong to those services (see lib.sh: the leader's session and
# an environment marker), never by name: `ray stop` is not used because it kills every Ray
# process on the machine, other people's test clusters included. The Ray head gets SIGTERM
# first and --grace seconds (15) to drain and stop its children; whatever is left then gets
# SIGTERM, and after 5 more seconds SIGKILL. Exits 0 when nothing of ours is left running.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

STATE_DIR=$(default_state_dir)
SERVICES="mlflow ray"
GRACE=15
while [ $# -gt 0 ]; do
    case $1 in
        --state-dir) [ $# -ge 2 ] || die "--state-dir needs a value"; STATE_DIR=$2; shift 2 ;;
        --ray-only) SERVICES=ray; shift ;;
        --mlflow-only) SERVICES=mlflow; shift ;;
        --grace) [ $# -ge 2 ] || die "--grace needs a value"; GRACE=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
[[ $GRACE =~ ^[0-9]+$ ]] || die "not a number: $GRACE"
[ -d "$STATE_DIR" ] || { echo "nothing to stop: no state dir $STATE_DIR"; exit 0; }
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)

status=0
for name in $SERVICES; do
    if stop_service "$name" "$GRACE"; then
        echo "$name: stopped"
    else
        case $? in
            1) echo "$name: not running" ;;
            *) status=1 ;;
        esac
    fi
done
write_env_file
exit "$status"

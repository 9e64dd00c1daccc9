#!/bin/sh
# The MLflow server image's default command: `mlflow server` with basic authentication, never
# open. It refuses to start without a secret key for the server's sessions and CSRF tokens and an
# admin password of the operator's own (MLflow's built-in default admin password is public).
# Further arguments go to `mlflow server` (--backend-store-uri, --artifacts-destination, ...);
# infra/k8s/mlflow/mlflow.yaml runs its own start script, which does the same with PostgreSQL.
set -eu
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?must be set (e.g. openssl rand -hex 32): the server signs sessions with it}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?must be set: the password of the admin account created on the first start}"
if [ "$MLFLOW_AUTH_ADMIN_PASSWORD" = "password1234" ]; then
    echo "MLFLOW_AUTH_ADMIN_PASSWORD is MLflow's public default: choose another" >&2
    exit 2
fi
exec mlflow server --host 0.0.0.0 --port 5000 --app-name basic-auth "$@"

# MLflow tracking server: PostgreSQL store, S3 artifact proxy, basic authentication.
#
# Build from the repository root:
#   docker build -f infra/docker/mlflow-server.Dockerfile -t REGISTRY/perceiver-mlflow:3.17.2 .
# The official MLflow image has neither a PostgreSQL driver nor boto3 nor the auth extra, so this
# one adds exactly those, pinned in requirements-mlflow-server.txt, and starts the server with
# basic authentication by default (mlflow-serve.sh). Configuration (database URI,
# bucket, credentials) comes from the environment at run time: see infra/k8s/mlflow/mlflow.yaml.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY infra/docker/requirements-mlflow-server.txt /tmp/pins/requirements.txt
COPY --chmod=0755 infra/docker/mlflow-serve.sh /usr/local/bin/mlflow-serve
RUN pip install --no-cache-dir -r /tmp/pins/requirements.txt \
    && python -c "import mlflow, psycopg2, boto3, flask_wtf" \
    && groupadd --gid 1000 mlflow \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlflow

USER 1000:1000
EXPOSE 5000
# Basic authentication, never open: mlflow-serve refuses to start without a secret key and an
# admin password (MLFLOW_FLASK_SERVER_SECRET_KEY, MLFLOW_AUTH_ADMIN_PASSWORD).
ENTRYPOINT ["/usr/local/bin/mlflow-serve"]

#!/usr/bin/env bash
# Start a single-node Ray head + an MLflow tracking server, both on loopback only.
# Usage: cluster/local/start.sh [STATE_DIR]   (default: ./.scpert-local)
# Keep STATE_DIR short: Ray socket paths under it must stay < 108 bytes.
# Stop with cluster/local/stop.sh [STATE_DIR]. Never use `ray stop`: it kills every Ray on the machine.
set -euo pipefail
STATE_DIR="${1:-./.scpert-local}"
RAY_PORT="${RAY_PORT:-6389}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
NUM_CPUS="${NUM_CPUS:-4}"
mkdir -p "$STATE_DIR/ray" "$STATE_DIR/mlartifacts"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # keep every Ray listener on 127.0.0.1

setsid ray start --head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --num-cpus "$NUM_CPUS" --temp-dir "$STATE_DIR/ray" >"$STATE_DIR/ray.log" 2>&1 &
echo "$!" >"$STATE_DIR/ray.pid"

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
  --artifacts-destination "$STATE_DIR/mlartifacts" >"$STATE_DIR/mlflow.log" 2>&1 &
echo "$!" >"$STATE_DIR/mlflow.pid"

echo "ray dashboard: http://127.0.0.1:$DASHBOARD_PORT   (ray job submit needs RAY_AUTH_MODE=token)"
echo "mlflow:        http://127.0.0.1:$MLFLOW_PORT      (export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT)"

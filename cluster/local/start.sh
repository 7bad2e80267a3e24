#!/usr/bin/env bash
# Start a single-node Ray head + an MLflow tracking server, both on loopback only, and wait until both answer.
# Usage: cluster/local/start.sh [STATE_DIR]   (default: ./.scpert-local)
# Keep STATE_DIR short: Ray socket paths under it must stay < 108 bytes.
# Stop with cluster/local/stop.sh [STATE_DIR]. Never use `ray stop`: it kills every Ray on the machine.
#
# Jobs get the tracking URI from here: Ray is started with MLFLOW_TRACKING_URI pointing at this MLflow server, and
# jobs/runtime_env.yaml passes "${MLFLOW_TRACKING_URI}" (expanded from Ray's environment) to every job.
set -euo pipefail
STATE_DIR="${1:-./.scpert-local}"
RAY_PORT="${RAY_PORT:-6389}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
AGENT_PORT="${AGENT_PORT:-52365}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
NUM_CPUS="${NUM_CPUS:-4}"
WAIT_S="${WAIT_S:-180}"
for tool in ray mlflow python; do
  command -v "$tool" >/dev/null || { echo "start.sh: '$tool' is not on PATH (activate the venv: . .venv/bin/activate)" >&2; exit 2; }
done
mkdir -p "$STATE_DIR/ray" "$STATE_DIR/mlartifacts"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"
DASHBOARD="http://127.0.0.1:$DASHBOARD_PORT"

for pidfile in "$STATE_DIR/ray.pid" "$STATE_DIR/mlflow.pid"; do
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "start.sh: already running ($pidfile); stop it first: cluster/local/stop.sh $STATE_DIR" >&2; exit 2
  fi
done

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # keep every Ray listener on 127.0.0.1
export RAY_USAGE_STATS_ENABLED=0             # no usage reporting from a local recipe
export RAY_AUTH_MODE=token                   # token auth (Ray's default); the CLI reads the token from ~/.ray
export MLFLOW_TRACKING_URI="$MLFLOW_URI"     # seen by every job through jobs/runtime_env.yaml
# token auth needs a token before `ray start`: a fresh machine has none (~/.ray/auth_token), so make one (kept
# if it exists; RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH set by the user win)
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  ray get-auth-token --generate >/dev/null 2>&1 || { echo "start.sh: could not create a Ray auth token (ray get-auth-token --generate)" >&2; exit 1; }
fi

setsid ray start --head --block --disable-usage-stats --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
  --num-cpus "$NUM_CPUS" --temp-dir "$STATE_DIR/ray" >"$STATE_DIR/ray.log" 2>&1 &
echo "$!" >"$STATE_DIR/ray.pid"

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
  --artifacts-destination "$STATE_DIR/mlartifacts" >"$STATE_DIR/mlflow.log" 2>&1 &
echo "$!" >"$STATE_DIR/mlflow.pid"

# answers(URL): 0 once anything answers HTTP there (an auth error is an answer), 1 while nothing listens
answers() {
  python - "$1" <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=3).read()
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
PY
}

ready() {
  answers "$MLFLOW_URI/health" || return 1
  answers "http://127.0.0.1:$AGENT_PORT/api/healthz" || return 1   # the job agent `ray job submit` needs
  ray job list --address "$DASHBOARD" >/dev/null 2>&1
}

deadline=$((SECONDS + WAIT_S))
until ready; do
  for name in ray mlflow; do
    if ! kill -0 "$(cat "$STATE_DIR/$name.pid")" 2>/dev/null; then
      echo "start.sh: $name exited during start-up; last lines of $STATE_DIR/$name.log:" >&2
      tail -n 15 "$STATE_DIR/$name.log" >&2
      "$(dirname "$0")/stop.sh" "$STATE_DIR" >/dev/null
      exit 1
    fi
  done
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "start.sh: Ray ($DASHBOARD) and MLflow ($MLFLOW_URI) did not both answer within ${WAIT_S} s" \
         "(logs: $STATE_DIR/ray.log, $STATE_DIR/mlflow.log; raise WAIT_S on a slow machine)" >&2
    "$(dirname "$0")/stop.sh" "$STATE_DIR" >/dev/null
    exit 1
  fi
  sleep 2
done

cat <<EOF
ready: Ray head $DASHBOARD and MLflow $MLFLOW_URI (state: $STATE_DIR)
jobs submitted here track into $MLFLOW_URI. In your shell:
  export RAY_AUTH_MODE=token MLFLOW_TRACKING_URI=$MLFLOW_URI
Ray dashboard in a browser asks for a token ("Unauthorized: Missing authentication token"): paste the output of
  ray get-auth-token
MLflow runs table: $MLFLOW_URI/#/experiments (open an experiment, then its "Runs" tab)
stop with: cluster/local/stop.sh $STATE_DIR
EOF

#!/usr/bin/env bash
# Stop ONLY what cluster/local/start.sh started (its process groups), never `ray stop`.
set -euo pipefail
STATE_DIR="${1:-./.scpert-local}"
for name in ray mlflow; do
  pidfile="$STATE_DIR/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true   # ray's drain on TERM can wait on its GCS for a long time
    echo "stopped $name (process group $pid)"
  fi
  rm -f "$pidfile"
done

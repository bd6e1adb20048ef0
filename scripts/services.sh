#!/usr/bin/env bash
# Start/stop the local services: Prefect server, MLflow UI, and the process serving the deployments.
# Usage: scripts/services.sh up|down|status   (called by `make up` / `make down`)
# Logs and PID files live in .run/ (git-ignored). Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=.run
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
API="http://127.0.0.1:${PREFECT_PORT}/api"
mkdir -p "$RUN"

start() {  # name, command...
  local name=$1; shift
  if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$RUN/$name.pid"))"; return
  fi
  nohup "$@" > "$RUN/$name.log" 2>&1 &
  echo $! > "$RUN/$name.pid"
  echo "started $name (pid $!, log $RUN/$name.log)"
}

wait_for() {  # url, what, seconds
  for _ in $(seq "$3"); do
    if curl -sf "$1" > /dev/null; then return 0; fi
    sleep 1
  done
  echo "$2 did not answer at $1 within $3 s; see $RUN/*.log" >&2; exit 1
}

MARK="# written by scripts/services.sh"

write_prefect_toml() {  # the project's own Prefect setting: the user's profiles are left alone
  if [ -f prefect.toml ] && ! head -1 prefect.toml | grep -q "$MARK"; then
    echo "prefect.toml exists and was not written by make up; set PREFECT_API_URL=$API yourself" >&2; return
  fi
  printf '%s (make down removes it)\n[api]\nurl = "%s"\n' "$MARK" "$API" > prefect.toml
}

up() {
  start prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_for "$API/health" "Prefect server" 120
  write_prefect_toml
  # no GenAI job consumers (7 extra processes): a UI and registry for this machine, light on 2 cores
  start mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$BIN/mlflow" server \
    --backend-store-uri "sqlite:///$PWD/mlflow.db" --host 127.0.0.1 --port "$MLFLOW_PORT"
  start serve env PREFECT_API_URL="$API" "$BIN/python" -m flows.serve
  for _ in $(seq 120); do
    if PREFECT_API_URL="$API" "$BIN/prefect" deployment ls 2>/dev/null | grep -q nightly; then break; fi
    sleep 1
  done
  wait_for "http://127.0.0.1:${MLFLOW_PORT}/health" "MLflow UI" 120
  echo
  echo "Prefect UI:  http://127.0.0.1:${PREFECT_PORT}   (PREFECT_API_URL in ./prefect.toml: commands run here use it)"
  echo "MLflow UI:   http://127.0.0.1:${MLFLOW_PORT}"
  echo "Run now:     $BIN/prefect deployment run 'adps-pipeline/nightly'"
}

down() {
  for name in serve mlflow prefect; do
    if [ -f "$RUN/$name.pid" ]; then
      pid=$(cat "$RUN/$name.pid")
      pkill -TERM -P "$pid" 2>/dev/null || true
      kill "$pid" 2>/dev/null && echo "stopped $name (pid $pid)" || true
      rm -f "$RUN/$name.pid"
    fi
  done
  if [ -f prefect.toml ] && head -1 prefect.toml | grep -q "$MARK"; then rm -f prefect.toml; fi
}

status() {
  for name in prefect mlflow serve; do
    if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
      echo "$name: running (pid $(cat "$RUN/$name.pid"))"
    else
      echo "$name: stopped"
    fi
  done
}

"${1:-status}"

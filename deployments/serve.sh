#!/usr/bin/env bash
# The local development stack: a Prefect server on loopback, the work pools, the deployments,
# and a process worker in the foreground (nothing here picks up 'wrpo-fusion/kubernetes': its
# runs wait for a Kubernetes worker, deployments/README.md). Ctrl-C twice stops them (Prefect's worker
# only asks its flow runs to stop on the first SIGINT; the second kills it), then the server.
#   make serve                        (or: deployments/serve.sh; port: PREFECT_PORT, default 4200)
# Then open http://127.0.0.1:$PREFECT_PORT, or from another shell:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   prefect deployment run 'wrpo-fusion/default' --watch
#   wrpo sources add my-model toy-world:demo/src-upper --n 4   # triggers 'wrpo-fusion/refusion'
#   prefect deployment run 'wrpo-discover/default' --param "discovery=$(wrpo config json --rules discovery.yaml)"
#                                     # new hub models -> registered -> 'wrpo-fusion/refusion'
# The worker's environment reaches the flow runs: HF_ENDPOINT / HF_TOKEN for 'wrpo-discover', and
# HF_HUB_OFFLINE must not be 1 for it (`make` sets it to 1: HF_HUB_OFFLINE=0 make serve).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PREFECT_PORT:-4200}"
BIN="${VENV_BIN:-.venv/bin}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p runs
PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT="$PORT" \
  setsid "$BIN/prefect" server start >runs/prefect-server.log 2>&1 &
SERVER=$!
trap 'kill -TERM -- "-$SERVER" 2>/dev/null || true' EXIT
echo "Prefect server starting on http://127.0.0.1:$PORT (log: runs/prefect-server.log)"
"$BIN/prefect" server status --wait --timeout 90 >/dev/null
PREFECT="$BIN/prefect" deployments/deploy.sh
echo "UI: http://127.0.0.1:$PORT   API: $PREFECT_API_URL"
case "${HF_HUB_OFFLINE:-0}" in
  1|ON|YES|TRUE|on|yes|true) echo "note: HF_HUB_OFFLINE=$HF_HUB_OFFLINE: 'wrpo-discover' cannot reach the hub (HF_HUB_OFFLINE=0 make serve)";;
esac
echo "Run:  PREFECT_API_URL=$PREFECT_API_URL $BIN/prefect deployment run 'wrpo-fusion/default' --watch"
"$BIN/prefect" worker start --pool wrpo-process

#!/usr/bin/env bash
# Registers the deployments of deployments/prefect.yaml (wrpo-fusion/default, wrpo-fusion/refusion,
# wrpo-discover/default) with the Prefect API in PREFECT_API_URL.
# Run from anywhere: deployments/deploy.sh [extra `prefect deploy` options]
# The worker runs flows from this checkout (WRPO_PROJECT_DIR); the work pool is created if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export WRPO_PROJECT_DIR="${WRPO_PROJECT_DIR:-$PWD}"
PREFECT="${PREFECT:-prefect}"
POOL=wrpo-process   # the pool prefect.yaml names
"$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1 || "$PREFECT" work-pool create "$POOL" --type process
exec "$PREFECT" --no-prompt deploy --all --prefect-file "${WRPO_PREFECT_FILE:-deployments/prefect.yaml}" "$@"

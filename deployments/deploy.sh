#!/usr/bin/env bash
# Registers the deployments of deployments/prefect.yaml (wrpo-fusion/default, wrpo-fusion/refusion,
# wrpo-discover/default on the process pool; wrpo-fusion/kubernetes on the Kubernetes pool) with the
# Prefect API in PREFECT_API_URL.
# Run from anywhere: deployments/deploy.sh [extra `prefect deploy` options]
# The process worker runs flows from this checkout (WRPO_PROJECT_DIR). The work pools are created if
# missing: `wrpo-kubernetes` from deployments/k8s-base-job-template.json, which the server checks the
# Kubernetes deployment's job variables against (creating the pool needs no prefect-kubernetes here: only
# its worker, in the cluster, does; deployments/README.md). An existing pool keeps its template: after
# editing the file, `prefect work-pool update wrpo-kubernetes --base-job-template deployments/k8s-base-job-template.json`.
set -euo pipefail
cd "$(dirname "$0")/.."
export WRPO_PROJECT_DIR="${WRPO_PROJECT_DIR:-$PWD}"
PREFECT="${PREFECT:-prefect}"
"$PREFECT" work-pool inspect wrpo-process >/dev/null 2>&1 \
  || "$PREFECT" work-pool create wrpo-process --type process
"$PREFECT" work-pool inspect wrpo-kubernetes >/dev/null 2>&1 \
  || "$PREFECT" work-pool create wrpo-kubernetes --type kubernetes \
       --base-job-template deployments/k8s-base-job-template.json
exec "$PREFECT" --no-prompt deploy --all --prefect-file "${WRPO_PREFECT_FILE:-deployments/prefect.yaml}" "$@"

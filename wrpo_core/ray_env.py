"""What a Ray worker gets from the Prefect worker's environment: variables forwarded by name.

Actors and Ray Train workers run on other machines, which see neither the driver's files nor its
environment. The variables named here are read from the environment of the process that starts
the run (the Prefect worker, `wrpo run`) and handed to Ray as the job's `runtime_env` env_vars,
so a stage on any node has the hub token, the S3 endpoint and keys, and the thread settings the
driver has. Values never come from a config or flow parameter (those are stored and shown by
Prefect): only names are configured, here and through `WRPO_FORWARD_ENV`.

On clusters whose nodes have their own credentials (instance profiles, Kubernetes service
accounts), unset the credential variables on the driver: nothing is forwarded that is not set.
Ray keeps a job's runtime_env in its control store, where the dashboard shows it to whoever can
reach the dashboard.
"""

from __future__ import annotations

import os
import re

FORWARDED_ENV = (
    # threads, caches, offline mode
    "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM",
    # the model hub
    "HF_TOKEN", "HF_ENDPOINT",
    # S3 and S3-compatible storage (s3fs / botocore, pyarrow)
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    # where training metrics also go (`report_to`)
    "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY",
)  # fmt: skip
"""Variables forwarded to every Ray actor and training worker when the driver has them set."""

EXTRA_ENV = "WRPO_FORWARD_ENV"
"""Comma-separated names of further variables to forward (e.g. `GOOGLE_APPLICATION_CREDENTIALS`)."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def forwarded_names() -> tuple[str, ...]:
    """FORWARDED_ENV plus the names in $WRPO_FORWARD_ENV; a malformed name is a ValueError naming it."""
    extra = [name.strip() for name in os.environ.get(EXTRA_ENV, "").split(",") if name.strip()]
    bad = [name for name in extra if not _NAME.match(name)]
    if bad:
        raise ValueError(f"{EXTRA_ENV}: {bad} are not environment variable names (comma-separated names)")
    return tuple(dict.fromkeys([*FORWARDED_ENV, *extra]))


def forwarded_env() -> dict[str, str]:
    """The forwarded variables that are set in this process, with their values (for `runtime_env`)."""
    return {name: os.environ[name] for name in forwarded_names() if name in os.environ}


SHIP_CODE_ENV = "WRPO_SHIP_CODE"
"""Set to 1 to upload this process's `wrpo_core` to the Ray cluster with every job (`py_modules`)."""


def runtime_env() -> dict[str, object]:
    """The `runtime_env` of a Ray job this process starts: the forwarded variables, and with
    $WRPO_SHIP_CODE=1 this checkout's `wrpo_core` package, which Ray uploads once per content and puts
    first on the workers' import path (nodes then run the driver's code even when their image holds
    another version). Off by default: the images hold the package, built from the same commit."""
    env: dict[str, object] = {"env_vars": forwarded_env()}
    flag = os.environ.get(SHIP_CODE_ENV, "0").strip()
    if flag not in ("0", "1", ""):
        raise ValueError(f"{SHIP_CODE_ENV}: {flag!r} is not 0 or 1")
    if flag == "1":
        import wrpo_core

        env["py_modules"] = [wrpo_core]
    return env

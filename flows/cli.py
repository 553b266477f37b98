"""The installed `wrpo` command: wrpo_core's CLI with the Prefect layer plugged in.

`wrpo sources add|remove` then emits the registry event that starts a re-fusion, and storage
options may name a Prefect block (`prefect_block`). Prefect is imported only when one of them
is used, so every other command works without the orchestration extra. See wrpo_core/cli.py
for the commands.
"""

from __future__ import annotations

import sys

from flows.events import emit_registry_event
from tasks.blocks import load_block_options
from wrpo_core import cli

HOOKS = cli.CliHooks(load_block=load_block_options, send_registry_event=emit_registry_event)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `wrpo` console script."""
    return cli.main(argv, hooks=HOOKS)


if __name__ == "__main__":
    sys.exit(main())

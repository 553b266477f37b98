"""Pins read from the lock files, for the Makefile and the tests (no dependencies: stdlib only).

    python requirements/lock_pins.py overlay requirements/constraints-cpu.txt \
        requirements/gpu-training.txt transformers accelerate trl deepspeed > constraints.txt

`overlay` prints the first file's pins with the named packages taken from the second file: the
CPU stack with the GPU lock's pure-Python versions, which CI's second test pass installs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503 normalized name: `Huggingface_Hub` -> `huggingface-hub`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str | Path) -> dict[str, str]:
    """`name -> version` for every `name==version` line of a requirements/lock file."""
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", "-")):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{path}: line {lineno}: not a `name==version` pin: {raw!r}")
        pins[canonical(match.group(1))] = match.group(3)
    return pins


def overlay(base: str | Path, lock: str | Path, packages: list[str]) -> str:
    """The pins of `base` with `packages` taken from `lock` (added if `base` lacks them)."""
    pins = read_pins(base)
    locked = read_pins(lock)
    for name in map(canonical, packages):
        if name not in locked:
            raise SystemExit(f"{lock}: has no pin for {name!r}")
        pins[name] = locked[name]
    header = f"# {Path(base).name} with {', '.join(packages)} from {Path(lock).name} (generated)\n"
    return header + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[0] != "overlay":
        raise SystemExit(__doc__)
    sys.stdout.write(overlay(argv[1], argv[2], argv[3:]))


if __name__ == "__main__":
    main(sys.argv[1:])

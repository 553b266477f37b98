#!/usr/bin/env bash
# Builds .whl/: the wheels that bench/gpu_check.sh installs on the lent GPU machine (Python 3.12,
# x86_64, no network), which lacks them or has other versions. Runs HERE, with PyPI reachable.
# Versions are the pins of requirements/gpu-training.txt (read with requirements/lock_pins.py).
# Binary wheels for cp312 manylinux x86_64 (pydantic-core, regex, multiprocess's py312 build);
# deepspeed is an sdist: built here into a pure-Python wheel (`pip wheel --no-deps`, no ops
# compiled; DeepSpeed JIT-builds what it needs on the GPU machine). Fails if .whl/ exceeds 60 MiB
# (the device tool carries 64 MiB of working tree in all).
#
#   bench/gpu_check_wheels.sh          # then, with the device tool: carry [".whl"], bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"   # any Python with pip; it need not be 3.12
LOCK=requirements/gpu-training.txt
LIMIT_MIB=60
# What the machine lacks (pydantic, deepspeed, datasets and their needs) or has at another version
# than the locks (transformers 5.17; typing-extensions and regex, older than pydantic/transformers need).
BINARY=(transformers pydantic pydantic-core annotated-types typing-inspection typing-extensions
        datasets dill multiprocess hjson regex)
SDIST=(deepspeed)

specs=$("$PYTHON" - "$LOCK" "${BINARY[@]}" "${SDIST[@]}" <<'PY'
import sys

sys.path.insert(0, "requirements")
from lock_pins import canonical, read_pins

lock, names = sys.argv[1], sys.argv[2:]
pins = read_pins(lock)
missing = [name for name in names if canonical(name) not in pins]
if missing:
    raise SystemExit(f"{lock}: no pin for {', '.join(missing)}")
print(" ".join(f"{name}=={pins[canonical(name)]}" for name in names))
PY
)
read -r -a SPECS <<<"$specs"
binary_specs=("${SPECS[@]:0:${#BINARY[@]}}")
sdist_specs=("${SPECS[@]:${#BINARY[@]}}")

rm -rf .whl
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
echo "gpu_check_wheels: downloading ${binary_specs[*]}" >&2
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d .whl "${binary_specs[@]}"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
echo "gpu_check_wheels: building ${sdist_specs[*]} from the sdist" >&2
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$build" "${sdist_specs[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps -w .whl "$build"/*.tar.gz

# One wheel per package (two versions of one stop the install), each of them pure or cp312.
"$PYTHON" - "${SPECS[@]}" <<'PY'
import re
import sys
from pathlib import Path

wheels = sorted(Path(".whl").glob("*.whl"))
names = [re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels]
wanted = {re.sub(r"[-_.]+", "-", spec.split("==")[0]).lower() for spec in sys.argv[1:]}
if sorted(names) != sorted(wanted):
    raise SystemExit(f".whl/: expected one wheel each of {sorted(wanted)}, got {[w.name for w in wheels]}")
wrong = [w.name for w in wheels if not re.search(r"-(py3|py312|cp312)-", w.name)]
if wrong:
    raise SystemExit(f".whl/: not for Python 3.12: {wrong}")
PY
total=0
for wheel in .whl/*.whl; do
    size=$(stat -c %s "$wheel")
    total=$((total + size))
    printf '%9.2f MiB  %s\n' "$(echo "$size / 1048576" | bc -l)" "${wheel#.whl/}"
done
printf '%9.2f MiB  total in .whl/ (%d wheels)\n' "$(echo "$total / 1048576" | bc -l)" "$(ls .whl/*.whl | wc -l)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_check_wheels: FAIL: .whl/ is over $LIMIT_MIB MiB" >&2
    exit 1
fi
git check-ignore -q .whl/ || echo "note: git does not ignore .whl/ (add /.whl/ to .gitignore or .git/info/exclude);" \
    "untracked, it travels with the working tree without carry" >&2

#!/usr/bin/env bash
# Install headless Chromium (for tests/prefect_ui.py) with apt-get if it is missing. Idempotent, for CI.
#
#   deployments/install-chromium.sh            # installs only if no working chromium is found
#   CHROMIUM_PACKAGES="chromium chromium-driver" deployments/install-chromium.sh
#
# Exit codes: 0 = a working chromium is on PATH (prints its path and version), 1 = could not install.
# On Debian 12 `apt-get install --no-install-recommends chromium` took ~16-21 s (~120 MB).
# Ubuntu's `chromium`/`chromium-browser` debs are snap wrappers that do not work in containers;
# there, set CHROME_BIN to a Chrome/Chromium binary instead.
set -euo pipefail

PACKAGES="${CHROMIUM_PACKAGES:-chromium}"
NAMES=(chromium chromium-browser google-chrome google-chrome-stable chrome chrome-headless-shell headless_shell)

die() {
    echo "install-chromium: ERROR: $*" >&2
    exit 1
}

# Prints the first chromium that runs (`--version` exits 0), honouring $CHROME_BIN first.
find_working() {
    local c path
    for c in ${CHROME_BIN:+"$CHROME_BIN"} "${NAMES[@]}"; do
        path=$(command -v "$c" 2>/dev/null) || continue
        if "$path" --version >/dev/null 2>&1; then
            echo "$path"
            return 0
        fi
    done
    return 1
}

report() {
    echo "install-chromium: $1 $("$1" --version 2>/dev/null | head -n1)"
}

if found=$(find_working); then
    report "$found"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "no chromium on PATH and no apt-get; install Chromium/Chrome and/or set CHROME_BIN."

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        die "no chromium on PATH; installing it needs root (or passwordless sudo): apt-get install $PACKAGES"
    fi
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -qq --no-install-recommends -o Dpkg::Use-Pty=0)
log=$(mktemp -t install-chromium.XXXXXX.log)
trap 'rm -f "$log"' EXIT

echo "install-chromium: installing $PACKAGES with apt-get ..."
# shellcheck disable=SC2086  # PACKAGES is a word list on purpose
if ! "${SUDO[@]}" apt-get install "${APT_OPTS[@]}" $PACKAGES >"$log" 2>&1; then
    # Package lists may be missing or stale (fresh container): update once and retry.
    "${SUDO[@]}" apt-get update -qq >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "apt-get update failed"; }
    # shellcheck disable=SC2086
    "${SUDO[@]}" apt-get install "${APT_OPTS[@]}" $PACKAGES >>"$log" 2>&1 \
        || { tail -n 20 "$log" >&2; die "apt-get install $PACKAGES failed (see the log above)"; }
fi

found=$(find_working) || {
    tail -n 20 "$log" >&2
    die "installed $PACKAGES, but no working chromium binary was found on PATH"
}
report "$found"

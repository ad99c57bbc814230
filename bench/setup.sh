#!/usr/bin/env bash
# Create bench/.venv and install the peer servers used by bench/run.py.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="${PYTHON:-python3}"
PEERS=(cheroot waitress gunicorn bottle CherryPy)

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
fi

missing=()
for pkg in "${PEERS[@]}"; do
    if ! "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${missing[@]}"
else
    echo "setup: peers already installed in $VENV"
fi

# Load generators (Debian packages); only report, never install silently.
for tool in wrk ab; do
    command -v "$tool" >/dev/null 2>&1 || \
        echo "setup: '$tool' not found; install with: apt-get install -y wrk apache2-utils" >&2
done
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -Ei '^(cheroot|waitress|gunicorn|bottle|cherrypy) ' || true

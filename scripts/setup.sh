#!/usr/bin/env bash
# Create .venv (once) and install customdiff with pinned versions. Idempotent and fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.customdiff-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, the pinned CPU build: a bare "torch" requirement, or torch==2.13.0 from PyPI alone, pulls a
  # multi-GB CUDA build. The CPU wheel where pip finds one (a local wheelhouse), else from PyTorch's CPU index.
  if ! .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0+cpu" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,ui]"
  echo "$want" > "$stamp"
fi
# The web UI's browser tests drive Debian's Chromium (Playwright's own browser download needs a network that CI
# lacks); CI installs it when missing, elsewhere those tests skip and say why.
if [ "${CI:-}" = "true" ] && [ ! -x "${CUSTOMDIFF_CHROMIUM:-/usr/bin/chromium}" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi

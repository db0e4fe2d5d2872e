#!/usr/bin/env bash
# What the Space browser tests (tests/test_space_browser.py) need: Debian's chromium and the
# Python playwright package (driving /usr/bin/chromium; `playwright install` is NOT used).
# Usage: .ci/space_deps.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
if ! [ -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi
"$PY" -m pip install -q "playwright>=1.50,<2"
/usr/bin/chromium --version
"$PY" -c "import playwright.sync_api; print('playwright python package OK')"

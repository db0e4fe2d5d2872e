#!/usr/bin/env bash
# Quick start: create .venv, install the kit (CPU torch), then run the main job — a bias and safety
# audit of the bundled trained checkpoint with the shipped probe sets — and print the report's path.
#   ./quickstart.sh              set up + run the audit
#   ./quickstart.sh --setup-only set up only (used by CI)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 first: on this project's machines that is the CPU build on disk (plain "torch" pulls CUDA).
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[all]"
# Every Eval Ever's schema/validator, used by the audit export tests; its releases declare Python
# >= 3.12 but the validator runs on 3.11, so it is installed without that check and without deps.
.venv/bin/python -m pip install -q --no-deps --ignore-requires-python "every-eval-ever==0.3.0"
if [ "${1:-}" = "--setup-only" ]; then
  exit 0
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
# a fresh folder per run: finished reports are never overwritten
.venv/bin/dsv41 audit run --suite bias,safety --out "runs/quickstart-audit-$(date +%Y%m%d-%H%M%S)"

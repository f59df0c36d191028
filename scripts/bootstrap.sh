#!/usr/bin/env bash
# Create ./.venv (if needed) and install the package with its test extras into it.
# torch is pinned first so pip takes the CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q ".[test]"

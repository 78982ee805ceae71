#!/usr/bin/env bash
# Creates .venv (CPU machine: torch 2.13.0 CPU build, triton for the interpreter tests) and installs zokern
# into it, editable. Idempotent: a second run only re-checks the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: nothing later may resolve an unpinned torch (that would pull CUDA wheels).
.venv/bin/python -m pip install -q -r requirements/cpu.txt -r requirements/finetune.txt
.venv/bin/python -m pip install -q --no-deps -r requirements/embedded.txt
# --no-build-isolation/--no-deps: build against the torch just installed, never resolve another one.
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .

#!/usr/bin/env bash
# Creates .venv (CPU machine: torch 2.13.0 CPU build, triton for the interpreter tests) and installs zokern into it,
# editable, with its finetune and dev extras. Idempotent: a second run re-checks the pins and, with unchanged C++
# sources, compiles nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: nothing later may resolve an unpinned torch (that would pull CUDA wheels); the same file
# constrains the install of zokern's dependencies.
.venv/bin/python -m pip install -q -r requirements/cpu.txt
# --no-build-isolation: setup.py builds the C++ extension against the torch just installed (a minute or two the
# first time; object files are kept in build/).
.venv/bin/python -m pip install -q -c requirements/cpu.txt --no-build-isolation -e ".[finetune,dev]"
.venv/bin/python -m pip install -q --no-deps -r requirements/embedded.txt

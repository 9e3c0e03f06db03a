#!/usr/bin/env bash
# Lint and run the test suite (unit + flow; benchmarks marked slow are left out).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Any non-zero pytest status fails this script, including 5 ("no tests collected").
.venv/bin/pytest -q "$@"

#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: dataset, virtual environment, pinned dependencies.
# Sourced by demo.sh and test.sh; safe to run again (it only does what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; then
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

# The HTML report's real-browser test (tests/test_report_html.py) renders it in headless
# Chromium; with CI set, that test fails rather than skips when the browser is missing.
if ! command -v chromium >/dev/null 2>&1; then
  echo "setup: installing Chromium (Debian package chromium) for the HTML report test"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q chromium >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi

PY="$(command -v python3.11 || command -v python3)"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
STAMP=.venv/.deepshrink-installed
if [ ! -f "$STAMP" ] || [ constraints.txt -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setup: installing pinned dependencies (torch 2.13.0 CPU from local disk)"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,bench,transformers,distributed]"
  touch "$STAMP"
fi

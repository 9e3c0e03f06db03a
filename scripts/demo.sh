#!/usr/bin/env bash
# The main job: evaluate every pretrained zoo model on the Fashion-MNIST test set and print the table.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/deepshrink models --evaluate --threads "${THREADS:-2}" "$@"

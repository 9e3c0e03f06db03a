#!/usr/bin/env bash
# The main job: the quick comparative study (lenet5 and resnet20 x eight methods, each from its
# shipped recipe: unstructured and structured pruning, int8 PTQ, 4-bit QAT, a KD student, Tucker,
# k-means + Huffman, and prune+KD+int8 combined), measured side by side into study.md, study.json
# and a self-contained report.html; then Deep Compression of LeNet-300-100 with its per-stage table.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
THREADS="${THREADS:-2}"
.venv/bin/deepshrink study --budget quick --out runs/demo-study --threads "$THREADS"
.venv/bin/deepshrink compress lenet300 --recipe deep-compression --out runs/demo-deep-compression-lenet300 --threads "$THREADS"

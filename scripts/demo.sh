#!/usr/bin/env bash
# The main job: Deep Compression (prune -> k-means share -> Huffman/rANS .dsz) of the pretrained
# LeNet-300-100 with its per-stage table, then every pretrained zoo model measured on the test set.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
THREADS="${THREADS:-2}"
.venv/bin/deepshrink compress lenet300 --recipe deep-compression --out runs/demo-deep-compression-lenet300 --threads "$THREADS"
.venv/bin/deepshrink models --evaluate --threads "$THREADS"

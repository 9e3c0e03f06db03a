#!/usr/bin/env bash
# Reproduces the zoo's pretrained Fashion-MNIST weights (deepshrink/models/pretrained/).
# Each run resumes from its checkpoint if interrupted. About 90 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DS=".venv/bin/deepshrink"
CK="${CHECKPOINTS:-/tmp/deepshrink-zoo-ckpt}"
train() { local name=$1; shift; [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && return 0; "$DS" train "$name" --publish --threads 2 --checkpoint "$CK/$name.pt" "$@"; }
train lenet300     --epochs 20 --lr 0.05 --weight-decay 1e-4
train lenet5       --epochs 20 --lr 0.05 --weight-decay 1e-4
train resnet20     --epochs 12 --lr 0.1 --augment
train vgg          --epochs 12 --lr 0.05 --augment
train lenet5_caffe --epochs 15 --lr 0.05 --weight-decay 1e-4
train mobilenetv2  --epochs 12 --lr 0.1 --weight-decay 1e-4 --augment

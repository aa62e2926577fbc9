#!/usr/bin/env bash
# Supervised fine-tuning (stage 2): start from a pre-trained modeling/ folder, train on prepared SFT data with
# NEFTune. Same environment variables as train.example.sh; defaults work on a CPU box after quickstart.
#
#   PRETRAINED=outputs/train/pretrain/modeling DATASET=outputs/quickstart/data/sft/arrow ./train_sft.example.sh
# Relative paths are taken from the directory you run it in; the defaults are the repository's outputs/.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"  # not entered: relative paths stay the caller's
export PRETRAINED=${PRETRAINED:-$REPO/outputs/train/pretrain/modeling}
export DATASET=${DATASET:-$REPO/outputs/quickstart/data/sft/arrow}
export SAVE_DIR=${SAVE_DIR:-$REPO/outputs/train/sft}
export LR=${LR:-2e-5}
export EXTRA_ARGS="${EXTRA_ARGS:-} --use_neft --neft_alpha ${NEFT_ALPHA:-0.1}"
exec "$REPO/train.example.sh"

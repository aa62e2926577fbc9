#!/usr/bin/env bash
# Supervised fine-tuning (stage 2): start from a pre-trained modeling/ folder, train on prepared SFT data with
# NEFTune. Same environment variables as train.example.sh; defaults work on a CPU box after quickstart.
#
#   PRETRAINED=outputs/train/pretrain/modeling DATASET=outputs/quickstart/data/sft/arrow ./train_sft.example.sh
set -euo pipefail
cd "$(dirname "$0")"
export PRETRAINED=${PRETRAINED:-outputs/train/pretrain/modeling}
export DATASET=${DATASET:-outputs/quickstart/data/sft/arrow}
export SAVE_DIR=${SAVE_DIR:-outputs/train/sft}
export LR=${LR:-2e-5}
export EXTRA_ARGS="${EXTRA_ARGS:-} --use_neft --neft_alpha ${NEFT_ALPHA:-0.1}"
exec ./train.example.sh

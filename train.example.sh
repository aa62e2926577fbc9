#!/usr/bin/env bash
# Continual pre-training with a booster plugin. Every setting is an environment variable with a default that works
# on a CPU box after quickstart's data preparation; on GPUs set PLUGIN=gemini (or zero2 / 3d) and bigger sizes.
#
#   PRETRAINED=ckpt/expanded-model DATASET=data/prepared/arrow NPROC=8 PLUGIN=gemini ./train.example.sh
#   HOSTFILE=hostfile ./train.example.sh          # multi-node: one host name per line (see hostfile.example)
#   HOSTFILE=hostfile SSH_PORT=2222 NPROC=8 ./train.example.sh   # sshd on a non-standard port on every host
#
# The recipe's stages (README "The recipe, stage by stage"), after tokenizer expansion and model init:
#   (a) new embeddings only:  EXTRA_ARGS="--freeze_non_embeds_params"
#   (b) knowledge injection:  DATASET=data/zh                          (validated on its held-out split)
#   (c) replay:               DATASET="data/zh:0.7 data/en:0.3"        (a mixture; validated per category)
#   (d) SFT:                  ./train_sft.example.sh                   (packed conversations, NEFTune)
#
# Relative paths (PRETRAINED, DATASET, SAVE_DIR, LOAD_CHECKPOINT, HOSTFILE, paths in EXTRA_ARGS) are taken from the
# directory you run it in, as for any command; the defaults are the repository's outputs/ (scripts/quickstart.sh).
set -euo pipefail
# The repository: train.py and its environment. The working directory stays the caller's (a relative SAVE_DIR
# must not write checkpoints into the repository).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# colossalai run starts a bare `torchrun`: the environment's bin must be on PATH.
if [[ -x "$REPO/.venv/bin/torchrun" ]]; then export PATH="$REPO/.venv/bin:$PATH"; fi

PRETRAINED=${PRETRAINED:-$REPO/outputs/quickstart/model_init}    # HF folder from init_model.py
DATASET=${DATASET:-$REPO/outputs/quickstart/data/zh}             # prepared output(s), space-separated, each DIR[:WEIGHT]
SAVE_DIR=${SAVE_DIR:-$REPO/outputs/train/pretrain}
NPROC=${NPROC:-2}
PLUGIN=${PLUGIN:-ddp}
BATCH_SIZE=${BATCH_SIZE:-1}
ACCUMULATION_STEPS=${ACCUMULATION_STEPS:-1}
MAX_LENGTH=${MAX_LENGTH:-256}
LR=${LR:-3e-4}
NUM_EPOCHS=${NUM_EPOCHS:-1}
MAX_STEPS=${MAX_STEPS:-4}                                 # unset for a full run: MAX_STEPS= ./train.example.sh
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
MIXED_PRECISION=${MIXED_PRECISION:-}                      # default: bf16 on CUDA, fp32 on CPU
TP=${TP:-1}
ZERO_STAGE=${ZERO_STAGE:-1}
EXTRA_ARGS=${EXTRA_ARGS:-}                                # e.g. "--use_flash_attn --use_grad_checkpoint"
LOAD_CHECKPOINT=${LOAD_CHECKPOINT:-}                      # a checkpoint dir, a modeling/ dir, or "latest"

# A scheduler stops a job with SIGTERM (preemption, scancel, an eviction); torchrun forwards it to every rank,
# which finish their step, save a checkpoint there and exit (train.py --stop_signals). torchrun kills them this many
# seconds later: room for a step and a checkpoint save (when the SIGTERM is torchrun's own, after a rank died, the
# others leave once the dead rank's heartbeat has been silent for 60 s). PET_SIGNALS_TO_HANDLE (torchrun's
# --signals_to_handle) makes it forward SIGUSR1 too (SLURM's --signal=USR1@T).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}

read -r -a datasets <<< "$DATASET"
args=(--pretrained "$PRETRAINED" --dataset "${datasets[@]}" --plugin "$PLUGIN" --save_dir "$SAVE_DIR"
      --tensorboard_dir "$SAVE_DIR/tensorboard" --config_file "$SAVE_DIR/config.json"
      --num_epochs "$NUM_EPOCHS" --batch_size "$BATCH_SIZE" --accumulation_steps "$ACCUMULATION_STEPS"
      --lr "$LR" --max_length "$MAX_LENGTH" --save_interval "$SAVE_INTERVAL" --tp "$TP" --zero_stage "$ZERO_STAGE"
      --grad_clip 1.0 --weight_decay 0.1)
[[ -n "$MAX_STEPS" ]] && args+=(--max_steps "$MAX_STEPS")
[[ -n "$MIXED_PRECISION" ]] && args+=(--mixed_precision "$MIXED_PRECISION")
[[ -n "$LOAD_CHECKPOINT" ]] && args+=(--load_checkpoint "$LOAD_CHECKPOINT")
# shellcheck disable=SC2206
args+=($EXTRA_ARGS)

launcher=(colossalai run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  # Multi-node: colossalai run reaches every host but localhost/127.0.0.1 over ssh (key login, port SSH_PORT) and
  # runs `cd $PWD; export <this environment>; torchrun ...` there (this working directory, too, must exist on each
  # host). Its hostfile parser takes no comments and a missing hostfile makes it exit 0 without training, so the
  # hosts are checked and copied without comments here.
  [[ -f "$HOSTFILE" ]] || { echo "train.example.sh: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }
  hosts=$(mktemp); trap 'rm -f "$hosts"' EXIT
  sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$HOSTFILE" >"$hosts"
  [[ -s "$hosts" ]] || { echo "train.example.sh: HOSTFILE=$HOSTFILE lists no host" >&2; exit 2; }
  # The first host is the rendezvous master every node connects to: "localhost" would be each node itself.
  first=$(head -n1 "$hosts")
  if [[ -z "${MASTER_ADDR:-}" && $(wc -l <"$hosts") -gt 1 && "$first" =~ ^(localhost|127\.0\.0\.1|::1)$ ]]; then
    echo "train.example.sh: HOSTFILE=$HOSTFILE: its first host, $first, is the rendezvous master, which the other" \
      "hosts would take for themselves: list a name or address they reach first, or set MASTER_ADDR" >&2
    exit 2
  fi
  launcher+=(--hostfile "$hosts" --master_addr "${MASTER_ADDR:-$(head -n1 "$hosts")}")
  [[ -n "${SSH_PORT:-}" ]] && launcher+=(--ssh-port "$SSH_PORT")
fi
rc=0
"${launcher[@]}" "$REPO/train.py" "${args[@]}" || rc=$?
if [[ $rc != 0 ]]; then
  # Every rank of a failed run exits; the launcher then prints its own report (ChildFailedError, per-rank exit
  # codes). The reason is further up: train.py prints a user error once, as a line starting with "error".
  echo "train.example.sh: training failed (exit $rc). The reason is the first line starting with 'error' above;" \
       "the launcher's report after it only lists the ranks that stopped. A run stopped by a signal says" \
       "'stopped by SIG...' instead, after saving a checkpoint: LOAD_CHECKPOINT=latest goes on from it." >&2
fi
exit $rc

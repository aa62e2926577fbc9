#!/usr/bin/env bash
# README test command: set up .venv (idempotent), install the browser for the chat-page test, run pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/test_packing.py -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh

# The chat web page is tested end to end in headless Chromium (Debian packages).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing chromium + chromium-driver (apt)"
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "[test] WARNING: apt-get could not install chromium: the browser test will be skipped (see pytest -ra)"
  else
    echo "[test] chromium/chromedriver missing and cannot apt-get: the browser test will be skipped"
  fi
fi

# The multi-node test starts its own sshd on two loopback addresses (Debian openssh-server; not run as a service).
if [[ ! -x /usr/sbin/sshd ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing openssh-server (apt)"
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; } \
      || echo "[test] WARNING: apt-get could not install openssh-server: the multi-node test will be skipped, or fail under CI=true"
  else
    echo "[test] /usr/sbin/sshd missing and cannot apt-get: the multi-node test will be skipped, or fail under CI=true"
  fi
fi

# `colossalai run` and the multi-process tests call a bare `torchrun`: the venv's bin must be on PATH.
export PATH="$ROOT/.venv/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
set +e
python -m pytest "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
  echo "[test] pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit $rc

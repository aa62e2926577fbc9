"""The device payload: ``gpu_check.sh --pack`` spreads the wheel kit, the full corpora and the SmolLM2 GGUF over
device calls that each stay under the 64 MiB a call may carry (with the tracked files), and ``gpu_check.sh``'s
setup on the device finds every wheel once and rebuilds the data root, the GGUF byte for byte (a missing part is
reported as a checksum failure, not trained on)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import REPO
from tests.support.require_data import require_data

sys.path.insert(0, str(REPO / "scripts"))
import gpu_pack  # noqa: E402

SHARED = REPO.parent / "shared"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def carried(tmp_path_factory) -> Path:
    require_data(SHARED / "gpu", "the GPU wheel kit (../shared/gpu)")
    require_data(SHARED / "data" / "models" / gpu_pack.GGUF, "the SmolLM2 GGUF")
    out = tmp_path_factory.mktemp("pack") / "carry"
    proc = subprocess.run([sys.executable, "scripts/gpu_pack.py", "--shared", str(SHARED), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def files_of(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_each_call_carries_at_most_64_mib_with_the_tracked_files(carried):
    folders = sorted(carried.iterdir())
    assert [f.name for f in folders] == ["1", "2", "3"]
    tracked = gpu_pack.tracked_bytes(REPO)
    loads = [sum(p.stat().st_size for p in files_of(f)) for f in folders]
    for folder, load in zip(folders, loads):
        assert load + tracked + gpu_pack.MARGIN <= gpu_pack.CALL_LIMIT, f"{folder}: {load + tracked} bytes"
    assert gpu_pack.CALL_LIMIT == 64 * 2**20 and gpu_pack.MARGIN > 0  # the device's limit, not the code's own figure
    assert max(loads) - min(loads) < 1 << 16, loads  # spread evenly: the GGUF tops every call up to the same load


def test_every_wheel_and_corpus_travels_once_and_the_gguf_parts_rebuild_it(carried):
    names = [p.name for p in files_of(carried)]
    wheels = sorted(p.name for p in (SHARED / "gpu").glob("*.whl"))
    assert sorted(n for n in names if n.endswith(".whl")) == wheels
    assert sorted(n for n in names if n.endswith(".jsonl")) == sorted(gpu_pack.CORPORA)
    parts = sorted(carried.glob(f"*/data/models/{gpu_pack.GGUF}.part-*"), key=lambda p: int(p.name.split("-")[-1]))
    assert len(parts) >= 2
    joined = b"".join(p.read_bytes() for p in parts)
    assert hashlib.md5(joined).hexdigest() == md5(SHARED / "data" / "models" / gpu_pack.GGUF)


def run_setup(carry: Path, tmp_path: Path) -> tuple:
    """gpu_check.sh's setup (and the quick dry-run correctness part) over ``carry``: (exit code, report text)."""
    report = tmp_path / "report.md"
    env = {**os.environ, "GPU_CARRY": str(carry), "GPU_REPORT": str(report), "GPU_WORK": str(tmp_path / "work"),
           "GPU_KIT": str(tmp_path / "no-kit"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "correctness"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, report.read_text()


def test_setup_finds_every_wheel_and_rebuilds_the_data_root(carried, tmp_path):
    code, report = run_setup(carried, tmp_path)
    assert code == 0, report
    wheels = len(list((SHARED / "gpu").glob("*.whl")))
    assert f"dry run, {wheels} wheels found" in report
    root = carried / "root"
    assert f"- data: {root} (3 pre-training files, SmolLM2 GGUF present)" in report
    assert md5(root / "models" / gpu_pack.GGUF) == md5(SHARED / "data" / "models" / gpu_pack.GGUF)
    for name in gpu_pack.CORPORA:
        assert md5(root / "pretrain" / name) == md5(SHARED / "data" / "pretrain" / name)
    assert (root / "sft").is_dir()  # the bundled slice is there too (SFT, eval, tokenizers)


def test_a_missing_part_fails_setup_on_the_checksum(carried, tmp_path):
    broken = tmp_path / "carry"
    subprocess.run(["cp", "-r", str(carried), str(broken)], check=True)
    subprocess.run(["rm", "-rf", str(broken / "root")], check=True)
    part = next(broken.glob(f"2/data/models/{gpu_pack.GGUF}.part-*"))
    part.unlink()
    assert not list(broken.glob(f"2/data/models/{gpu_pack.GGUF}.part-*"))  # the fault: call 2's part never arrived
    code, report = run_setup(broken, tmp_path)
    assert code != 0
    assert "reassembled from 2 parts with the wrong checksum" in report


def test_a_carried_folder_missing_stops_setup_in_one_line(carried, tmp_path):
    """The device keeps a machine 30 s idle: a third call that lands on a fresh one has folder 3 alone (no
    colossalai wheel, the GGUF's first part and its checksum gone). Setup says so and stops, before any work."""
    alone = tmp_path / "carry"
    alone.mkdir(exist_ok=True)
    subprocess.run(["cp", "-r", str(carried / "3"), str(alone)], check=True)
    assert sorted(p.name for p in alone.iterdir()) == ["3"]  # the fault: calls 1 and 2's folders are gone
    code, report = run_setup(alone, tmp_path)
    assert code == 2
    assert "1 of the 3 carried folders are here" in report and "back to back" in report
    assert "## correctness" not in report

"""The shipped launchers run as documented: `colossalai run` + train.py, two stages, on real prepared data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def launch(script: str, env: dict, log: Path) -> None:
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **env}
    with open(log, "w") as out:
        proc = subprocess.run(["bash", str(REPO / script)], env=full_env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{log.read_text()[-3000:]}"


def test_pretrain_then_sft_launchers_train_two_stages(tmp_path, tiny_llama, prepared_pretrain):
    stage1, stage2 = tmp_path / "pretrain", tmp_path / "sft"
    common = {"NPROC": "2", "MAX_STEPS": "3", "MAX_LENGTH": "128", "DATASET": str(prepared_pretrain / "arrow")}
    launch("train.example.sh", {**common, "PRETRAINED": str(tiny_llama), "SAVE_DIR": str(stage1)},
           tmp_path / "stage1.log")
    launch("train_sft.example.sh", {**common, "PRETRAINED": str(stage1 / "modeling"), "SAVE_DIR": str(stage2)},
           tmp_path / "stage2.log")
    for stage in (stage1, stage2):
        assert (stage / "modeling" / "config.json").is_file() and (stage / "modeling" / "tokenizer.json").is_file()
        assert len((stage / "losses.jsonl").read_text().splitlines()) == 3
    resolved = json.loads((stage2 / "config.json").read_text())
    assert resolved["pretrained"] == str(stage1 / "modeling") and resolved["use_neft"] is True

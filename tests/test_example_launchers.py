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


def launch(script: str, env: dict, log: Path, expect_success: bool = True, cwd: Path = None) -> int:
    """``bash REPO/script`` with ``env``, run in ``cwd`` (default: this process's working directory)."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **env}
    with open(log, "w") as out:
        proc = subprocess.run(["bash", str(REPO / script)], env=full_env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=600, cwd=cwd)
    if expect_success:
        assert proc.returncode == 0, f"{script} failed:\n{log.read_text()[-3000:]}"
    return proc.returncode


SYSTEM = "你是一个乐于助人的助手。"


def prepare_sft_slice(data_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """The real Chinese chatterbot conversations, LLaMA-2 template with a system message."""
    from colossal_llama.dataset.config import OutputLayout, SFTPrepConfig
    from colossal_llama.dataset.prepare import prepare_sft

    prepare_sft(SFTPrepConfig(input_dirs=[data_dir / "sft" / "chatterbot_zh.jsonl"], tokenizer_dir=tokenizer_dir,
                              output=OutputLayout.under(out), max_length=128, num_bins=1,
                              chat_template="llama2", system_message=SYSTEM))
    return out


def test_pretrain_then_sft_launchers_train_two_stages(tmp_path, tiny_llama, prepared_pretrain, data_dir):
    from colossal_llama.inference.prompting import resolve_chat_template
    from colossal_llama.tokenizer.loading import load_tokenizer

    stage1, stage2 = tmp_path / "pretrain", tmp_path / "sft"
    sft_data = prepare_sft_slice(data_dir, tiny_llama, tmp_path / "sft_data")
    common = {"NPROC": "2", "MAX_STEPS": "3", "MAX_LENGTH": "128"}
    launch("train.example.sh", {**common, "PRETRAINED": str(tiny_llama), "SAVE_DIR": str(stage1),
                                "DATASET": str(prepared_pretrain / "arrow")}, tmp_path / "stage1.log")
    launch("train_sft.example.sh", {**common, "PRETRAINED": str(stage1 / "modeling"), "SAVE_DIR": str(stage2),
                                    "DATASET": str(sft_data / "arrow")}, tmp_path / "stage2.log")
    for stage in (stage1, stage2):
        assert (stage / "modeling" / "config.json").is_file() and (stage / "modeling" / "tokenizer.json").is_file()
        assert len((stage / "losses.jsonl").read_text().splitlines()) == 3
    resolved = json.loads((stage2 / "config.json").read_text())
    assert resolved["pretrained"] == str(stage1 / "modeling") and resolved["use_neft"] is True
    # The SFT data's template travels with the model, so inference prompts exactly like the training data.
    assert not (stage1 / "modeling" / "colossal_llama_chat.json").exists()
    saved = json.loads((stage2 / "modeling" / "colossal_llama_chat.json").read_text())
    assert saved == {"name": "llama2", "system_message": SYSTEM}
    template = resolve_chat_template(stage2 / "modeling", load_tokenizer(stage2 / "modeling"))
    assert (template.name, template.system_message) == ("llama2", SYSTEM)

    # Re-running stage 1 over its finished run is refused; the launcher says where the reason is.
    rc = launch("train.example.sh", {**common, "PRETRAINED": str(tiny_llama), "SAVE_DIR": str(stage1),
                                     "DATASET": str(prepared_pretrain / "arrow")}, tmp_path / "again.log",
                expect_success=False)
    lines = (tmp_path / "again.log").read_text().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert rc != 0 and len(errors) == 1 and errors[0].startswith(f"error: --save_dir {stage1}: holds an earlier run")
    assert lines[-1].startswith("train.example.sh: training failed") and "first line starting with 'error'" in lines[-1]


def test_a_hostfile_that_names_localhost_first_among_several_is_refused(tmp_path):
    """The first host is the rendezvous master: with others after it, they would look for it at their own
    localhost and wait there (hostfile.example starts with localhost, the way a user extends it)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# this machine, then a second one\nlocalhost\nnode-2\n")
    log = tmp_path / "refused.log"
    assert launch("train.example.sh", {"HOSTFILE": str(hostfile)}, log, expect_success=False) == 2
    assert log.read_text().strip() == (
        f"train.example.sh: HOSTFILE={hostfile}: its first host, localhost, is the rendezvous master, which the "
        "other hosts would take for themselves: list a name or address they reach first, or set MASTER_ADDR")


def test_relative_paths_are_the_callers_for_both_launchers(tmp_path, tiny_llama, prepared_pretrain, data_dir):
    """The README's stage commands (``PRETRAINED=model_init DATASET=data/zh SAVE_DIR=ckpt/a ./train.example.sh``)
    run from the user's own folder: every relative path is taken from there, and no checkpoint lands in the
    repository."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "model_init").symlink_to(tiny_llama)
    (work / "data" / "zh").symlink_to(prepared_pretrain)
    prepare_sft_slice(data_dir, tiny_llama, work / "data" / "sft")
    repo_had_ckpt = (REPO / "ckpt").exists()
    common = {"NPROC": "1", "MAX_STEPS": "1", "MAX_LENGTH": "128"}
    launch("train.example.sh", {**common, "PRETRAINED": "model_init", "DATASET": "data/zh", "SAVE_DIR": "ckpt/a"},
           tmp_path / "stage_a.log", cwd=work)
    launch("train_sft.example.sh", {**common, "PRETRAINED": "ckpt/a/modeling", "DATASET": "data/sft",
                                    "SAVE_DIR": "ckpt/d"}, tmp_path / "stage_d.log", cwd=work)
    for stage, pretrained in (("a", "model_init"), ("d", "ckpt/a/modeling")):
        assert (work / "ckpt" / stage / "modeling" / "config.json").is_file()
        assert len((work / "ckpt" / stage / "losses.jsonl").read_text().splitlines()) == 1
        assert json.loads((work / "ckpt" / stage / "config.json").read_text())["pretrained"] == pretrained
    assert (REPO / "ckpt").exists() == repo_had_ckpt  # nothing written into the repository


def test_a_relative_hostfile_is_read_from_the_callers_folder(tmp_path):
    """Checked (and refused here: localhost first among several) before anything starts: the launcher found it."""
    (tmp_path / "hosts").write_text("localhost\nnode-2\n")
    log = tmp_path / "refused.log"
    assert launch("train.example.sh", {"HOSTFILE": "hosts"}, log, expect_success=False, cwd=tmp_path) == 2
    assert log.read_text().strip().startswith("train.example.sh: HOSTFILE=hosts: its first host, localhost, is the "
                                              "rendezvous master")

"""`pip install -e .` gives a working console command for every CLI the package declares in setup.py."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = re.findall(r'"(colossal-llama-[\w-]+)=([\w.]+):(\w+)"', (REPO / "setup.py").read_text())


def test_setup_declares_the_pipeline_commands():
    names = {name for name, _, _ in ENTRY_POINTS}
    assert {"colossal-llama-init-tokenizer", "colossal-llama-init-model", "colossal-llama-prepare-pretrain",
            "colossal-llama-prepare-sft", "colossal-llama-train", "colossal-llama-generate",
            "colossal-llama-evaluate"} <= names


@pytest.mark.parametrize("name, module, func", ENTRY_POINTS, ids=[n for n, _, _ in ENTRY_POINTS])
def test_console_command_is_installed_and_answers_help(name, module, func):
    command = Path(sys.executable).with_name(name)
    assert command.is_file(), f"{name} not installed: run scripts/setup_env.sh (pip install -e .)"
    out = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


@pytest.mark.parametrize("name, module, func", ENTRY_POINTS, ids=[n for n, _, _ in ENTRY_POINTS])
def test_a_bad_flag_is_one_line_and_exit_code_2(name, module, func):
    """No argparse usage block (under torchrun every rank would print one): ``error: <command>: <what>``."""
    command = Path(sys.executable).with_name(name)
    out = subprocess.run([str(command), "--no_such_flag", "1"], capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("error: ") and "(see --help)" in lines[0], lines  # the missing flags, or this one

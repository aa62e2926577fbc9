"""Loss curves: real TensorBoard event files (SummaryWriter) -> a PNG with one subplot per logged scalar."""
from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from colossal_llama.utils.plot_losses import main, plot_scalars, read_scalars
from colossal_llama.utils.errors import UserInputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(log_dir: Path, steps=range(1, 41), start: int = 0) -> None:
    """Scalars with the tags train.py logs, shaped like a real run: decaying loss, warm-up + cosine lr."""
    writer = SummaryWriter(str(log_dir))
    for step in steps:
        writer.add_scalar("train/loss", 10.5 * math.exp(-step / 15) + 2.0, step)
        writer.add_scalar("train/lr", 3e-4 * min(1.0, step / 5) * (0.55 + 0.45 * math.cos(math.pi * step / 40)), step)
        writer.add_scalar("train/tokens_per_s", 1200.0 + 10 * (step % 3), step)
        writer.add_scalar("train/grad_norm", 1.0 / step, step)
    writer.close()


def png_size(path: Path) -> tuple:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, "not a PNG"
    return struct.unpack(">II", head[16:24])  # IHDR width, height


def test_reads_every_point_of_the_logged_tags(tmp_path):
    write_run(tmp_path / "run")
    series = read_scalars(tmp_path / "run")
    assert list(series) == ["train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm"]
    assert [s for s, _ in series["train/loss"]] == list(range(1, 41))
    assert series["train/loss"][0][1] == pytest.approx(10.5 * math.exp(-1 / 15) + 2.0, rel=1e-6)


def test_a_resumed_run_merges_event_files(tmp_path):
    write_run(tmp_path / "run", steps=range(1, 21))
    write_run(tmp_path / "run", steps=range(15, 31))  # resume from step 15 writes a second event file
    steps = [s for s, _ in read_scalars(tmp_path / "run")["train/loss"]]
    assert steps == list(range(1, 31))


def test_cli_writes_a_png_with_one_panel_per_scalar(tmp_path, capsys):
    write_run(tmp_path / "run")
    out = tmp_path / "plots" / "loss.png"
    main(["--log_dir", str(tmp_path / "run"), "--output", str(out), "--title", "test run"])
    width, height = png_size(out)
    assert (width, height) == (800, 4 * 260)  # figsize 8 x 2.6 per panel at 100 dpi
    assert out.stat().st_size > 20_000  # drawn curves and labels, not an empty canvas
    assert "train/loss 40 points (steps 1..40)" in capsys.readouterr().out
    only_loss = plot_scalars({"train/loss": [(1, 3.0), (2, 2.5)]}, tmp_path / "one.png")
    assert png_size(only_loss) == (800, 260)


def test_missing_or_empty_dirs_are_one_line_errors(tmp_path):
    script = Path(__file__).resolve().parents[1] / "colossal_llama" / "utils" / "plot_losses.py"
    proc = subprocess.run([sys.executable, str(script), "--log_dir", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'nope'}: log directory does not exist"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no TensorBoard event files"):
        read_scalars(tmp_path / "empty")
    writer = SummaryWriter(str(tmp_path / "other"))
    writer.add_scalar("eval/accuracy", 0.3, 1)
    writer.close()
    with pytest.raises(UserInputError, match="none of the scalars"):
        read_scalars(tmp_path / "other")


def test_validation_curves_get_one_panel_per_measure_with_a_line_per_category(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in (0, 5, 10):
        writer.add_scalar("train/loss", 3.0 - step / 10, step)
        for name, offset in (("news", 0.0), ("novel", 0.5), ("all", 0.2)):
            writer.add_scalar(f"eval/loss/{name}", 3.2 - step / 10 + offset, step)
            writer.add_scalar(f"eval/bpc/{name}", 1.5 - step / 100 + offset, step)
    writer.close()
    series = read_scalars(tmp_path / "run")
    assert [s for s, _ in series["eval/loss/novel"]] == [0, 5, 10] and series["eval/bpc/news"][0][1] == 1.5
    out = plot_scalars(series, tmp_path / "eval.png", title="stage 2")
    assert png_size(out) == (800, 3 * 260)  # train/loss, validation loss, validation bits/char

"""``colossal-llama-plot-losses``: TensorBoard log dir -> one PNG with loss, learning rate and throughput curves.

    python colossal_llama/utils/plot_losses.py --log_dir runs/exp1 --output loss.png

Plots whichever of ``train/loss``, ``train/lr``, ``train/tokens_per_s`` (and ``train/grad_norm``, ``train/mfu``)
the run logged, one subplot each, against the training step; validation (``eval/loss/<category>``,
``eval/bpc/<category>``) gets one subplot per measure with a line per category.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from, flag
from colossal_llama.utils.errors import UserInputError, cli_entry

TAGS = {  # tag -> y-axis label, in subplot order
    "train/loss": "loss",
    "train/lr": "learning rate",
    "train/tokens_per_s": "tokens / s",
    "train/grad_norm": "grad norm",
    "train/mfu": "MFU",
}

EVAL_GROUPS = {"eval/loss/": "validation loss", "eval/bpc/": "validation bits/char"}  # prefix -> y label

Series = List[Tuple[int, float]]


def _known(tag: str) -> bool:
    return tag in TAGS or any(tag.startswith(prefix) for prefix in EVAL_GROUPS)


def read_scalars(log_dir) -> Dict[str, Series]:
    """``{tag: [(step, value), ...]}`` for the known tags present in the event files under ``log_dir``.

    Several event files (e.g. a resumed run) are merged; for a step logged twice the later file wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise UserInputError(f"{log_dir}: log directory does not exist")
    files = sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise UserInputError(f"{log_dir}: no TensorBoard event files (events.out.tfevents.*)")
    merged: Dict[str, Dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        for tag in (t for t in acc.Tags()["scalars"] if _known(t)):
            merged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    if not merged:
        raise UserInputError(f"{log_dir}: event files hold none of the scalars {', '.join(TAGS)}")
    ordered = [t for t in TAGS if t in merged] + sorted(t for t in merged if t not in TAGS)
    return {tag: sorted(merged[tag].items()) for tag in ordered}


def _subplots(series: Dict[str, Series]) -> List[Tuple[str, str, Dict[str, Series]]]:
    """(title, y label, {line label: points}) per subplot: one per train tag, one per validation measure."""
    panels = [(tag, TAGS[tag], {tag: points}) for tag, points in series.items() if tag in TAGS]
    for prefix, label in EVAL_GROUPS.items():
        lines = {tag[len(prefix):]: points for tag, points in series.items() if tag.startswith(prefix)}
        if lines:
            panels.append((prefix.rstrip("/"), label, lines))
    return panels


def plot_scalars(series: Dict[str, Series], output, title: Optional[str] = None) -> Path:
    """Write one subplot per series to ``output`` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _subplots(series)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (panel, label, lines) in zip(axes[:, 0], panels):
        for name, points in lines.items():
            steps, values = zip(*points)
            ax.plot(steps, values, linewidth=1.2, marker="." if len(points) < 50 else None, label=name)
        ax.set_ylabel(label)
        ax.set_title(panel, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        if panel == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100, format="png")
    plt.close(fig)
    return output


@dataclass
class PlotConfig:
    """``colossal-llama-plot-losses``'s flags (this class *is* its command line)."""

    log_dir: Path = flag(help="TensorBoard dir written by train.py --tensorboard_dir")
    output: Optional[Path] = flag(None, help="PNG path (default: <log_dir>/losses.png)")
    title: Optional[str] = flag(None, help="the figure's title")


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, PlotConfig)
    cfg = config_from(p.parse_args(argv), PlotConfig)
    series = read_scalars(cfg.log_dir)
    out = plot_scalars(series, cfg.output or cfg.log_dir / "losses.png", cfg.title)
    summary = ", ".join(f"{tag} {len(pts)} points (steps {pts[0][0]}..{pts[-1][0]})" for tag, pts in series.items())
    print(f"wrote {out}: {summary}")
    return 0


if __name__ == "__main__":
    main()

"""Room for checkpoints on the filesystem of ``--save_dir`` (rank 0).

A checkpoint of LLaMA-2-7B takes about 63 GiB (bf16 weights and two fp32 Adam states: 10 bytes a parameter), one
of a 70B model about 640 GiB, and a run that fills its disk does so at a checkpoint, hours in. So the run says what
checkpoints take and what is free: at start (estimated from the parameters), and after every checkpoint
(measured), with a warning as soon as the next one will not fit, a save interval before it fails. A save that runs out of space anyway stops with
one line naming the checkpoint, what it needs and what is free (instead of ``OSError: [Errno 28]`` from inside
torch or colossalai); its half-written folder is removed when the next run takes the save dir.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or the user's quota on a shared filesystem
NEARLY_FULL_BYTES = 16 * 2**20  # less than this free after a failed write: the write failed for want of space
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32, per trainable parameter (every plugin saves them so)


def tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (apparent sizes)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # deleted meanwhile (the trash works in the background)
                pass
    return total


def free_bytes(path: Path) -> int:
    """Bytes a non-root user may still write on the filesystem holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_estimate(num_parameters: int, trainable_parameters: int, weight_bytes: int, lora: bool,
                        master_weights: bool = False) -> int:
    """Bytes of one checkpoint: the weights as saved (``weight_bytes`` each; a LoRA run saves only its trainable
    tensors), the optimizer's two fp32 states per trainable parameter, and with ``master_weights`` its fp32 master
    copy of each. Small files (configs, tokenizer, RNG, schedule) are left out."""
    saved = trainable_parameters if lora else num_parameters
    return saved * weight_bytes + trainable_parameters * (ADAM_STATE_BYTES + (4 if master_weights else 0))


def size_words(num_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def out_of_space(err: BaseException, path: Path) -> bool:
    """Whether ``err``, raised while writing under ``path``, means the space ran out. Writers say it their own way:
    ``OSError`` 28 (Python), ``SafetensorError('... No space left on device (os error 28)')``, and torch.save only
    ``RuntimeError('... unexpected pos 576 vs 534')``, so a filesystem left with almost nothing free counts too."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in OUT_OF_SPACE:
            return True
        if any(os.strerror(code) in str(seen) for code in OUT_OF_SPACE):
            return True
        seen = seen.__cause__ or seen.__context__
    return free_bytes(path) < NEARLY_FULL_BYTES


class CheckpointRoom:
    """What a checkpoint takes (estimated until the first one is measured) against what ``save_dir`` has free."""

    def __init__(self, save_dir: Path, estimate: int):
        self.save_dir = Path(save_dir)
        self.expected = estimate
        self.measured = False

    def report_at_start(self) -> None:
        free = free_bytes(self.save_dir)
        log.info("checkpoints: about %s each (estimated from the parameters); %s free on the filesystem of "
                 "--save_dir", size_words(self.expected), size_words(free))
        if free < self.expected:
            log.warning("--save_dir %s: %s free, less than one checkpoint (about %s): the first save will fail; "
                        "free space or choose another --save_dir", self.save_dir, size_words(free),
                        size_words(self.expected))

    def after_save(self, name: str, size: int, seconds: float, returning: int) -> None:
        """Checkpoint ``name`` (just published) took ``size`` bytes; ``returning``: bytes of older checkpoints being
        deleted."""
        self.expected, self.measured = size, True
        free = free_bytes(self.save_dir)
        log.info("checkpoint %s: %s in %.1f s (%s/s); %s free on the filesystem of --save_dir%s", name,
                 size_words(size), seconds, size_words(size / max(seconds, 1e-9)), size_words(free),
                 f" (+{size_words(returning)} being deleted)" if returning else "")
        if free + returning < size:
            log.warning("--save_dir %s: the next checkpoint (about %s) will not fit in the %s free%s: free space "
                        "or set --keep_last_k before then (older checkpoints are deleted only once a newer one is "
                        "complete)", self.save_dir, size_words(size), size_words(free + returning),
                        " once the deletions end" if returning else "")

    def no_room(self, name: str) -> str:
        """The one line for a save that ran out of space."""
        how = "measured" if self.measured else "estimated"
        return (f"--save_dir {self.save_dir}: no space left while saving {name} (a checkpoint takes "
                f"about {size_words(self.expected)}, {how}; {size_words(free_bytes(self.save_dir))} free now): free "
                "space or set --keep_last_k, then resume with --load_checkpoint latest")

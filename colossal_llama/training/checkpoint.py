"""Checkpoints: ``save_dir/epoch-E_step-S/{modeling/, optimizer/, lr_scheduler, running_states.json, rng/}``.

Atomicity: every rank writes into ``save_dir/.tmp-epoch-E_step-S``; after a barrier rank 0 writes
``running_states.json`` last, fsyncs the tree and renames it into place. A crash at any point before the rename
leaves only a ``.tmp-*`` dir, which is never mistaken for a checkpoint (a complete one has
``running_states.json`` and no ``.tmp-`` prefix) and is removed by the next save of the same step.

``modeling/`` is a full Hugging Face folder (config, safetensors, tokenizer), so it doubles as the input of the
next training stage (``--load_checkpoint .../modeling`` loads weights only) and of inference.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from colossal_llama.utils.errors import UserInputError
from colossal_llama.dataset.chat_templates import CHAT_CONFIG_FILE
from colossal_llama.utils.json_files import write_json

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^epoch-(\d+)_step-(\d+)$")
RUNNING_STATES = "running_states.json"
TMP_PREFIX = ".tmp-"


@dataclass
class RunningState:
    """Where training stands after ``step`` optimizer steps.

    ``sample_offset`` = sequences of ``epoch`` already consumed (the next step starts there);
    ``global_batch`` = sequences per optimizer step when it was saved.
    """

    epoch: int
    step: int
    sample_offset: int
    global_batch: int
    world_size: int


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch-{epoch}_step-{step}"


# ---------------------------------------------------------------------------------------------- RNG, per rank
def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- file system
def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (so the rename publishes durable contents)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rank 0: fsync ``tmp`` and rename it to ``final`` (replacing an older ``final``)."""
    _fsync_tree(tmp)
    if final.exists():  # e.g. the final modeling/ of an earlier run in the same save_dir
        stale = final.with_name(TMP_PREFIX + "old-" + final.name)
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        shutil.rmtree(stale)
    tmp.rename(final)
    _fsync_dir(final.parent)


def _prepare_tmp(save_dir: Path, name: str) -> Path:
    """All ranks: a fresh empty ``save_dir/.tmp-<name>`` (rank 0 clears leftovers of a crashed save)."""
    tmp = save_dir / (TMP_PREFIX + name)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


# ---------------------------------------------------------------------------------------------- saving
@dataclass
class ModelFiles:
    """What makes ``modeling/`` a self-contained HF folder besides the weights."""

    config: object  # transformers PretrainedConfig, captured before the plugin shards the model
    tokenizer: object
    chat_template: Optional[dict]  # the manifest's chat_template block, or None

    def write(self, directory: Path) -> None:
        self.config.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        if self.chat_template is not None:
            write_json(directory / CHAT_CONFIG_FILE, self.chat_template)


def params_are_replicated(booster) -> bool:
    """True when every rank holds the full model (ddp, ZeRO-1/2): rank 0 can write it alone."""
    from colossalai.booster.plugin import LowLevelZeroPlugin, TorchDDPPlugin

    return isinstance(booster.plugin, (TorchDDPPlugin, LowLevelZeroPlugin))


def _save_weights(booster, model, directory: Path, files: ModelFiles) -> None:
    """Collective. Replicated params: rank 0 writes safetensors with HF's ``save_pretrained`` (which handles tied
    embeddings; colossalai's safetensors writer refuses shared tensors). Sharded params (tp, gemini): colossalai
    gathers them into HF-style ``pytorch_model-*.bin`` shards plus an index."""
    if params_are_replicated(booster):
        if dist.get_rank() == 0:
            model.unwrap().save_pretrained(str(directory), safe_serialization=True)
    else:
        booster.save_model(model, str(directory), shard=True, use_safetensors=False, size_per_shard=1024)
    if dist.get_rank() == 0:
        files.write(directory)


def _optimizer_is_replicated(booster) -> bool:
    from colossalai.booster.plugin import TorchDDPPlugin

    return isinstance(booster.plugin, TorchDDPPlugin)


def _save_optimizer(booster, optimizer, directory: Path) -> None:
    """ddp: one ``optimizer/optimizer.bin`` from rank 0 (its sharded loader needs CUDA synchronize, even on CPU);
    ZeRO / 3d: colossalai's per-rank shards + index."""
    if _optimizer_is_replicated(booster):
        if dist.get_rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
        booster.save_optimizer(optimizer, str(directory / "optimizer.bin"), shard=False)
    else:
        booster.save_optimizer(optimizer, str(directory), shard=True)


def _load_optimizer(booster, optimizer, directory: Path) -> None:
    single = directory / "optimizer.bin"
    booster.load_optimizer(optimizer, str(single if single.is_file() else directory))


def save_checkpoint(booster, model, optimizer, scheduler, save_dir: Path, state: RunningState,
                    files: ModelFiles) -> Path:
    """Collective: write a complete checkpoint atomically; returns its final path."""
    name = checkpoint_name(state.epoch, state.step)
    final = save_dir / name
    tmp = _prepare_tmp(save_dir, name)
    _save_weights(booster, model, tmp / "modeling", files)
    _save_optimizer(booster, optimizer, tmp / "optimizer")
    booster.save_lr_scheduler(scheduler, str(tmp / "lr_scheduler"))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(capture_rng(), tmp / "rng" / f"rank-{dist.get_rank():05d}.pt")
    dist.barrier()  # every rank's shards and RNG are on disk
    if dist.get_rank() == 0:
        write_json(tmp / RUNNING_STATES, asdict(state))  # written last: its presence marks completeness
        _publish(tmp, final)
    dist.barrier()
    return final


def save_final_model(booster, model, save_dir: Path, files: ModelFiles) -> Path:
    """Collective: ``save_dir/modeling`` as a HF folder loadable by ``AutoModelForCausalLM.from_pretrained``."""
    final = save_dir / "modeling"
    tmp = _prepare_tmp(save_dir, "modeling")
    _save_weights(booster, model, tmp, files)
    dist.barrier()
    if dist.get_rank() == 0:
        _publish(tmp, final)
    dist.barrier()
    return final


# ---------------------------------------------------------------------------------------------- loading
def is_complete_checkpoint(path: Path) -> bool:
    return (path / RUNNING_STATES).is_file() and not path.name.startswith(TMP_PREFIX)


def latest_checkpoint(save_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step in ``save_dir`` (``.tmp-*`` leftovers ignored)."""
    if not save_dir.is_dir():
        return None
    found = []
    for child in save_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and is_complete_checkpoint(child):
            found.append((int(match.group(2)), child))
    return max(found)[1] if found else None


def weights_path(modeling_dir: Path) -> Path:
    """What ``booster.load_model`` takes: the dir when sharded (index file), else the single weights file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (modeling_dir / index).is_file():
            return modeling_dir
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (modeling_dir / single).is_file():
            return modeling_dir / single
    raise UserInputError(f"--load_checkpoint {modeling_dir}: no model weights (safetensors/bin) in this folder")


@dataclass
class LoadTarget:
    kind: str  # "resume" (full checkpoint) or "weights" (a modeling/ folder: next training stage)
    path: Path


def resolve_load_target(load_checkpoint: Optional[str], save_dir: Path) -> Optional[LoadTarget]:
    if load_checkpoint is None:
        return None
    if load_checkpoint == "latest":
        latest = latest_checkpoint(save_dir)
        if latest is None:
            log.info("--load_checkpoint latest: no complete checkpoint in %s, starting from scratch", save_dir)
            return None
        return LoadTarget("resume", latest)
    path = Path(load_checkpoint)
    if not path.is_dir():
        raise UserInputError(f"--load_checkpoint {path}: directory does not exist")
    if is_complete_checkpoint(path):
        return LoadTarget("resume", path)
    if (path / "modeling").is_dir():
        raise UserInputError(f"--load_checkpoint {path}: incomplete checkpoint ({RUNNING_STATES} missing)")
    weights_path(path)  # raises when there are no weights
    return LoadTarget("weights", path)


def _saved_keys(modeling_dir: Path) -> set:
    """Parameter names stored in a HF folder (safetensors headers or the shard index), without loading tensors."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (modeling_dir / index).is_file():
            return set(json.loads((modeling_dir / index).read_text())["weight_map"])
    weights = weights_path(modeling_dir)
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            return set(fh.keys())
    return set(torch.load(weights, map_location="cpu", weights_only=True))


def load_weights(booster, model, modeling_dir: Path) -> None:
    """Collective: load a HF folder into the boosted model.

    Checked by name first, because HF folders of tied-embedding models (SmolLM2) omit ``lm_head.weight``:
    the only keys allowed to be missing are parameters that share storage with a stored one.
    """
    module = model.unwrap()
    expected = set(module.state_dict().keys())
    saved = _saved_keys(modeling_dir)
    tied = {name for name in expected if name.endswith("lm_head.weight")} if module.config.tie_word_embeddings else set()
    missing, unexpected = expected - saved - tied, saved - expected
    if missing or unexpected:
        raise UserInputError(
            f"--load_checkpoint {modeling_dir}: weights do not match the model of --pretrained "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    booster.load_model(model, str(weights_path(modeling_dir)), strict=False)


def load_checkpoint(booster, model, optimizer, scheduler, path: Path) -> RunningState:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; returns the data position."""
    state = RunningState(**json.loads((path / RUNNING_STATES).read_text(encoding="utf-8")))
    load_weights(booster, model, path / "modeling")
    _load_optimizer(booster, optimizer, path / "optimizer")
    booster.load_lr_scheduler(scheduler, str(path / "lr_scheduler"))
    rng_file = path / "rng" / f"rank-{dist.get_rank():05d}.pt"
    if state.world_size == dist.get_world_size() and rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s: saved with %d ranks, running %d: RNG streams restart from the seed (data position is exact)",
                    path, state.world_size, dist.get_world_size())
    return state

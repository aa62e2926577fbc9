"""Checkpoints: ``save_dir/epoch-E_step-S/{modeling/, optimizer/, lr_scheduler, running_states.json, rng/}``.

Atomicity: every rank writes into ``save_dir/.tmp-epoch-E_step-S``; after a barrier (and, when the ranks run on
several machines, a flush of each machine's writes: ``syncfs``) rank 0 writes ``running_states.json`` last, fsyncs
the tree and renames it into place. A crash at any point before the rename
leaves only a ``.tmp-*`` dir, which is never mistaken for a checkpoint (a complete one has
``running_states.json`` and no ``.tmp-`` prefix) and is removed when the next run takes the save dir. Rank 0
deletes folders (older checkpoints, leftovers) through the run's :class:`~colossal_llama.training.trash.Trash`:
renamed aside at once, deleted in the background, so no rank waits for it in a collective.

``modeling/`` is a full Hugging Face folder (config, safetensors, tokenizer), so it doubles as the input of the
next training stage (``--load_checkpoint .../modeling`` loads weights only) and of inference.

:class:`Checkpointer` owns what it saves (booster, model, optimizer, scheduler); the loop only hands it the
data position (:class:`RunningState`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from colossal_llama.dataset.chat_templates import CHAT_CONFIG_FILE
from colossal_llama.model.lora_checkpoint import ADAPTER_CONFIG, is_lora_checkpoint
from colossal_llama.training import lora
from colossal_llama.training.checkpoint_files import verify_checkpoint_files
from colossal_llama.training.disk_space import CheckpointRoom, out_of_space, tree_bytes
from colossal_llama.training.distributed import on_rank0
from colossal_llama.training.loss_scale import restore_loss_scale, save_loss_scale
from colossal_llama.training.master_weights import restore_master_weights, save_master_weights
from colossal_llama.training.optim import follow_settings, settings_of
from colossal_llama.training.plugin import Parallelism
from colossal_llama.training.trash import Trash
from colossal_llama.utils.durable import flush_filesystem, fsync_dir, fsync_tree
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import read_json, write_json

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^epoch-(\d+)_step-(\d+)$")
RUNNING_STATES = "running_states.json"
TMP_PREFIX = ".tmp-"
FINAL_MODEL = "modeling"


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
    category_tokens: Optional[dict] = None  # input tokens seen per category so far (the mixture's realisation)
    data_order: Optional[dict] = None  # what the epoch order is drawn from (training.inputs.epoch_order_inputs)
    validation_due: bool = False  # this step's validation was skipped by a stop: the resumed run does it first

    @property
    def name(self) -> str:
        """The checkpoint's folder name, ``epoch-E_step-S``: E is the epoch of the last step taken (the original's
        name). At an epoch's end the state points at the next epoch's first sample already; named after that
        epoch, a 3-epoch run ended with ``epoch-3``, and the last step of epoch 0 was saved as ``epoch-1``."""
        ended_epoch = self.sample_offset == 0 and self.step > 0 and self.epoch > 0
        return f"epoch-{self.epoch - 1 if ended_epoch else self.epoch}_step-{self.step}"


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
def _publish(tmp: Path, final: Path, trash: Trash) -> int:
    """Rank 0: fsync ``tmp`` and rename it to ``final`` (an older ``final`` goes to the trash); returns its bytes."""
    size = fsync_tree(tmp)
    trash.discard(final)  # e.g. a checkpoint of the same step re-done after a resume
    tmp.rename(final)
    fsync_dir(final.parent)
    return size


# ---------------------------------------------------------------------------------------------- machines
@dataclass(frozen=True)
class Machines:
    """How the ranks sit on machines: ``count`` of them, and whether this rank flushes its machine's writes."""

    count: int = 1
    flushes: bool = False

    @classmethod
    def of_world(cls) -> "Machines":
        """Collective: machines told apart by torchrun's node rank (``GROUP_RANK``; ``colossalai run`` starts one
        torchrun per host), else by host name; the first rank of each machine flushes it."""
        if dist.get_world_size() == 1:
            return cls()
        group = os.environ.get("GROUP_RANK")
        mine = f"node {group}" if group is not None else f"host {socket.gethostname()}"
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, mine)
        first = {}
        for rank, name in enumerate(names):
            first.setdefault(name, rank)
        return cls(len(first), first[mine] == dist.get_rank())


# ---------------------------------------------------------------------------------------------- model files
@dataclass
class ModelFiles:
    """What makes ``modeling/`` a self-contained HF folder besides the weights."""

    config: object  # transformers PretrainedConfig, captured before the plugin shards the model
    tokenizer: object
    chat_template: Optional[dict]  # the manifest's chat_template block, or None
    state_keys: frozenset  # the whole model's state-dict names (a pipeline stage holds only some of them)

    def write(self, directory: Path) -> None:
        self.config.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        if self.chat_template is not None:
            write_json(directory / CHAT_CONFIG_FILE, self.chat_template)


# ---------------------------------------------------------------------------------------------- finding checkpoints
def is_complete_checkpoint(path: Path) -> bool:
    return (path / RUNNING_STATES).is_file() and not path.name.startswith(TMP_PREFIX)


def complete_checkpoints(save_dir: Path) -> list[Path]:
    """Complete checkpoints in ``save_dir``, oldest (lowest step) first; ``.tmp-*`` leftovers ignored."""
    if not save_dir.is_dir():
        return []
    found = []
    for child in save_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and is_complete_checkpoint(child):
            found.append((int(match.group(2)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(save_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step in ``save_dir``, or None."""
    found = complete_checkpoints(save_dir)
    return found[-1] if found else None


def _weight_index(modeling_dir: Path) -> Optional[Path]:
    """The shard index (``weight_map``: tensor name -> file) of a sharded HF folder, else None."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (modeling_dir / index).is_file():
            return modeling_dir / index
    return None


def weights_path(modeling_dir: Path, flag: str = "--load_checkpoint") -> Path:
    """What ``booster.load_model`` takes: the dir when sharded (index file), else the single weights file.
    ``flag``: the option that named the folder, for the error when it holds no weights."""
    if _weight_index(modeling_dir) is not None:
        return modeling_dir
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (modeling_dir / single).is_file():
            return modeling_dir / single
    raise UserInputError(f"{flag} {modeling_dir}: no model weights (safetensors/bin) in this folder")


@dataclass
class LoadTarget:
    kind: str  # "resume" (full checkpoint) or "weights" (a modeling/ folder: next training stage)
    path: Path

    @property
    def modeling_dir(self) -> Path:
        """The folder of the weights to load: the checkpoint's ``modeling/``, or the folder itself."""
        return self.path / FINAL_MODEL if self.kind == "resume" else self.path


def resolve_load_target(load_checkpoint: Optional[str], save_dir: Path,
                        restarted: bool = False) -> Optional[LoadTarget]:
    """What ``--load_checkpoint`` names; ``restarted``: in a torchrun restart of a job that claimed ``save_dir``
    before, the job's progress since comes first (:func:`restart_checkpoint`): the command names where the job
    started (a checkpoint, a new stage's weights, or nothing), not how far it got."""
    if restarted and load_checkpoint != "latest":
        progress = restart_checkpoint(None if load_checkpoint is None else Path(load_checkpoint), save_dir)
        if progress is not None:
            return LoadTarget("resume", progress)
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
    held = complete_checkpoints(path)
    if held:
        raise UserInputError(f"--load_checkpoint {path}: a save dir, not a checkpoint; continue its run with "
                             f"--load_checkpoint latest --save_dir {path}, or name its newest checkpoint: "
                             f"--load_checkpoint {held[-1]}")
    if (path / "modeling").is_dir():
        raise UserInputError(f"--load_checkpoint {path}: incomplete checkpoint ({RUNNING_STATES} missing)")
    weights_path(path)  # raises when there are no weights
    return LoadTarget("weights", path)


def restart_checkpoint(named: Optional[Path], save_dir: Path) -> Optional[Path]:
    """In a torchrun restart of a job that claimed ``save_dir``: the newest complete checkpoint of ``save_dir`` (the
    job's progress: its claim removed or refused any earlier run's), at or above the step of the checkpoint
    ``named`` when the job resumed from one; None when there is none. ``named`` may be gone: once newer ones exist
    ``--keep_last_k`` deletes it, and its step is then read from its name. A ``named`` that is no checkpoint (a
    new stage's weights, or nothing named) puts no floor: the job's own checkpoints are all newer than it."""
    step = 0
    if named is not None and is_complete_checkpoint(named):
        step = read_running_state(named).step
    elif named is not None and CHECKPOINT_RE.match(named.name):
        step = _step_of(named)
    ours = [c for c in complete_checkpoints(save_dir) if _step_of(c) >= step]
    return ours[-1] if ours else None


def is_checkpoint_of(path: Path, save_dir: Path) -> bool:
    """Whether ``path`` is one of ``save_dir``'s own checkpoints (directly in it; links resolved)."""
    return path.resolve().parent == save_dir.resolve()


ABANDONED_DIR = "abandoned"  # in --save_dir: newer checkpoints of a branch a resume from an older one left


def set_aside_newer_checkpoints(target: Path, save_dir: Path) -> list[Path]:
    """Rank 0, holding the save dir's lock, when resuming from ``target``, an older checkpoint of ``save_dir`` (a
    loss spike, a damaged newest one): its newer complete checkpoints are moved into ``save_dir/abandoned/``, where
    neither ``--load_checkpoint latest`` (a restart of this run) nor ``--keep_last_k`` takes them for this run's.
    Nothing is deleted. Returns where they went."""
    if not is_checkpoint_of(target, save_dir):
        return []
    newer = [c for c in complete_checkpoints(save_dir) if _step_of(c) > _step_of(target)]
    moved = []
    for checkpoint in newer:
        place = save_dir / ABANDONED_DIR / checkpoint.name
        while place.exists():  # set aside before, by another resume
            place = place.with_name(place.name + "+")
        place.parent.mkdir(exist_ok=True)
        checkpoint.rename(place)
        moved.append(place)
    if moved:
        fsync_dir(save_dir / ABANDONED_DIR)
        fsync_dir(save_dir)
        log.warning("resuming from %s: its %d newer checkpoints (%s) are moved to %s, where neither "
                    "--load_checkpoint latest nor --keep_last_k takes them for this run's; delete them when done",
                    target.name, len(moved), ", ".join(c.name for c in newer), save_dir / ABANDONED_DIR)
    return moved


def verify_checkpoint(path: Path) -> None:
    """A one-line error naming the damaged file of checkpoint ``path`` and the newest older complete checkpoint."""
    try:
        verify_checkpoint_files(path)
        _check_rng_files(path)
    except UserInputError as err:
        older = [c for c in complete_checkpoints(path.parent) if c != path and _step_of(c) < _step_of(path)]
        way_on = (f"the newest older complete checkpoint is {older[-1]} (pass --load_checkpoint {older[-1]})"
                  if older else "no older complete checkpoint exists (start afresh with --overwrite)")
        raise UserInputError(f"{err}: checkpoint {path} is damaged; {way_on}") from None


def read_running_state(path: Path) -> RunningState:
    """``running_states.json`` of checkpoint ``path``; a one-line error naming it when it is not one."""
    record = read_json(path / RUNNING_STATES)
    try:
        return RunningState(**record)
    except TypeError as err:
        raise UserInputError(f"{path / RUNNING_STATES}: not a running state ({err})") from None


def _check_rng_files(path: Path) -> None:
    """One RNG state per rank the checkpoint was saved with (a resume on as many ranks reads its own)."""
    saved_by = read_running_state(path).world_size
    for rank in range(saved_by):
        rng_file = path / "rng" / f"rank-{rank:05d}.pt"
        if not rng_file.is_file():
            raise UserInputError(f"{rng_file}: missing (the checkpoint was saved by {saved_by} ranks; an incomplete "
                                 "copy?)")


# config.json keys that fix the shapes of a model's weights (and so whether a checkpoint's weights fit it)
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def check_same_model(modeling_dir: Path, pretrained: str) -> None:
    """A one-line error when the weights in ``modeling_dir`` (a checkpoint's ``modeling/`` or a folder to start a
    stage from) belong to a model of other shapes than ``--pretrained``'s, by their ``config.json`` (e.g. the base
    model given after a vocabulary expansion): loading them would fail deep in torch with a size mismatch.
    Skipped when either has no ``config.json`` (a hub id: the weight names are still checked when loading)."""
    saved, base = (read_json(Path(folder) / "config.json", missing_ok=True) for folder in (modeling_dir, pretrained))
    if saved is None or base is None:
        return
    differ = [f"{key} {saved[key]} vs {base[key]}" for key in SHAPE_KEYS
              if key in saved and key in base and saved[key] != base[key]]
    if differ:
        raise UserInputError(f"--load_checkpoint {modeling_dir}: its weights are of another model than --pretrained "
                             f"{pretrained} ({', '.join(differ)}): pass the --pretrained they were trained from")


DATA_KINDS = {"pretrain": "pre-training", "sft": "SFT"}


def check_same_stage(target: LoadTarget, kind: Optional[str]) -> None:
    """A one-line error when a full checkpoint was saved by a run on another kind of data (``"pretrain"`` /
    ``"sft"``) than ``--dataset``'s: a resume goes on with the saved run's step count, schedule, optimizer states
    and data position, so a finished pre-training run "resumed" on SFT data trained nothing and saved its weights
    as an SFT model (exit 0), and an unfinished one went on with pre-training's schedule. The next stage starts
    from the weights. The kind is what the checkpoint's weights folder says: a run on SFT data writes its chat
    template there (:data:`CHAT_CONFIG_FILE`), one on pre-training data does not (checkpoints of every version)."""
    if target.kind != "resume" or kind not in DATA_KINDS:
        return
    saved = "sft" if (target.modeling_dir / CHAT_CONFIG_FILE).is_file() else "pretrain"
    if saved != kind:
        article = "an" if saved == "sft" else "a"
        raise UserInputError(f"--load_checkpoint {target.path}: a checkpoint of {article} {DATA_KINDS[saved]} run, "
                             f"and --dataset holds {DATA_KINDS[kind]} data: resuming would go on with that run's steps, "
                             f"schedule and optimizer; start the {DATA_KINDS[kind]} stage from its weights with "
                             f"--load_checkpoint {target.modeling_dir}")


def check_lora_matches(target: LoadTarget, lora_rank: int) -> None:
    """A one-line error when what ``target`` holds and this run disagree on LoRA: a LoRA run's checkpoint holds
    only the adapters (and trained embeddings) of one rank, a full run's the whole model; a weights-only folder
    is the model LoRA adapters would sit on, so it is ``--pretrained``."""
    path, modeling = target.path, target.modeling_dir
    if target.kind == "weights":
        if lora_rank:
            raise UserInputError(f"--load_checkpoint {path} with --lora_rank: give that folder as --pretrained "
                                 "(LoRA adapters sit on top of the weights the model is built from)")
        return
    if not is_lora_checkpoint(modeling):
        if lora_rank:
            raise UserInputError(f"--load_checkpoint {path}: a full run's checkpoint, and this run has --lora_rank "
                                 f"{lora_rank}: resume it without --lora_rank, or train LoRA on its weights as a new "
                                 f"stage with --pretrained {modeling}")
        return
    saved_rank = read_json(modeling / ADAPTER_CONFIG).get("r")
    if not lora_rank:
        raise UserInputError(f"--load_checkpoint {path}: a LoRA run's checkpoint (adapters of rank {saved_rank} "
                             f"only): resume it with --lora_rank {saved_rank} and the --pretrained it trained on")
    if saved_rank != lora_rank:
        raise UserInputError(f"--load_checkpoint {path}: its adapters have rank {saved_rank}, this run "
                             f"--lora_rank {lora_rank}: resume with --lora_rank {saved_rank}")


def _step_of(path: Path) -> int:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(2)) if match else -1


def _saved_keys(modeling_dir: Path, flag: str) -> set:
    """Parameter names stored in a HF folder (safetensors headers or the shard index), without loading tensors."""
    index = _weight_index(modeling_dir)
    if index is not None:
        return set(json.loads(index.read_text())["weight_map"])
    weights = weights_path(modeling_dir, flag)
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            return set(fh.keys())
    return set(torch.load(weights, map_location="cpu", weights_only=True, mmap=True))  # names only: nothing read


def check_weight_names(expected: set, saved: set, tie_word_embeddings: bool, where: str) -> set:
    """Refuse a weights folder whose tensor names are not the model's (one line naming ``where``); returns the
    tied LM head names that the folder may omit (HF writes a tied ``lm_head.weight`` once, as the embedding).

    Also allowed: ``rotary_emb.inv_freq`` tensors, which checkpoints saved with older transformers versions carry
    (many LLaMA-family folders on the hub); the model recomputes them from its config, and loading skips them.
    """
    tied = {name for name in expected if name.endswith("lm_head.weight")} if tie_word_embeddings else set()
    missing = expected - saved - tied
    unexpected = {name for name in saved - expected if not name.endswith(".rotary_emb.inv_freq")}
    if missing or unexpected:
        raise UserInputError(f"{where}: weights do not match the model of --pretrained "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return tied


def _read_saved_tensor(modeling_dir: Path, key: str, flag: str) -> torch.Tensor:
    """One tensor of a HF folder, read from the file that holds it (not the whole model)."""
    index = _weight_index(modeling_dir)
    weights = (modeling_dir / json.loads(index.read_text())["weight_map"][key] if index is not None
               else weights_path(modeling_dir, flag))
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            return fh.get_tensor(key)
    return torch.load(weights, map_location="cpu", weights_only=True, mmap=True)[key]


# ---------------------------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves and restores the boosted model, optimizer and scheduler (plus each rank's RNG) under ``save_dir``.

    Every method is collective: all ranks call it together.
    """

    def __init__(self, booster, model, optimizer, scheduler, parallel: Parallelism, save_dir: Path,
                 files: ModelFiles, trash: Trash, room: CheckpointRoom, lora: bool = False,
                 keep_last_k: Optional[int] = None, async_save: bool = False, machines: Optional[Machines] = None):
        self.booster, self.model, self.optimizer, self.scheduler = booster, model, optimizer, scheduler
        self.trash = trash  # rank 0 deletes through it, in the background
        self.room = room  # what a checkpoint takes and what the filesystem has free (rank 0 reports)
        self.parallel = parallel
        self.save_dir = Path(save_dir)
        self.files = files
        self.lora = lora  # checkpoints hold the trainable LoRA state; the final model is merged
        self.keep_last_k = keep_last_k  # complete checkpoints kept (older ones deleted once a newer is complete)
        self.async_save = async_save  # optimizer states written in the background (colossalai, CUDA)
        self.machines = machines or Machines()  # several machines flush their writes before a publish
        # written, not yet published: (tmp folder, final path, the state's record as it was at the save,
        # time.monotonic() when the save began); the loop goes on changing the RunningState itself
        self._pending: Optional[tuple[Path, Path, dict, float]] = None

    # ------------------------------------------------------------------ saving
    def save(self, state: RunningState) -> Path:
        """Write a checkpoint of ``state``; returns its final path. It becomes complete (``running_states.json``
        written last, the folder renamed into place) once every file is on disk: at once, or with
        ``--async_save`` when the background writes are done (at the next save or the end of training)."""
        self.complete_pending()
        name = state.name
        final = self.save_dir / name
        with self._one_line_when_full(name):
            started = time.monotonic()
            tmp = self._fresh_tmp(name)
            self._save_weights(tmp / FINAL_MODEL)
            self._save_optimizer(tmp / "optimizer")
            save_master_weights(self.model, self.optimizer, tmp / "optimizer", self.parallel)
            save_loss_scale(self.optimizer, tmp / "optimizer")
            self.booster.save_lr_scheduler(self.scheduler, str(tmp / "lr_scheduler"))
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(capture_rng(), tmp / "rng" / f"rank-{dist.get_rank():05d}.pt")
            self._pending = (tmp, final, asdict(state), started)
            if not self.async_save:
                self.complete_pending()
        return final

    @contextlib.contextmanager
    def _one_line_when_full(self, name: str):
        """A write that failed for want of space becomes one line (see :mod:`~colossal_llama.training.disk_space`)."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - torch.save says RuntimeError, safetensors SafetensorError
            if out_of_space(err, self.save_dir):
                raise UserInputError(self.room.no_room(name)) from None
            raise

    def complete_pending(self) -> Optional[Path]:
        """Publish the checkpoint whose files are being written, after waiting for them; rotate old ones."""
        if self._pending is None:
            return None
        tmp, final, record, started = self._pending
        self._pending = None
        self._every_write_durable(final.name)
        if dist.get_rank() == 0:
            write_json(tmp / RUNNING_STATES, record)  # written last: its presence marks completeness
            size = _publish(tmp, final, self.trash)
            returning = self._rotate()
            self.room.after_save(final.name, size, time.monotonic() - started, returning)
        dist.barrier()
        return final

    def _rotate(self) -> int:
        """Rank 0, after a checkpoint became complete: keep the newest ``keep_last_k`` complete checkpoints;
        returns the bytes of those it deletes.

        An old checkpoint is renamed to a ``.tmp-`` name at once (one atomic step: from then on it is not a
        checkpoint) and deleted in the background; a crash in between leaves a leftover the next run removes."""
        if not self.keep_last_k:
            return 0
        returning = 0
        for old in complete_checkpoints(self.save_dir)[:-self.keep_last_k]:
            returning += tree_bytes(old)
            self.trash.discard(old)
            log.info("--keep_last_k %d: deleting %s", self.keep_last_k, old)
        return returning

    def save_final(self) -> Path:
        """``save_dir/modeling`` as a HF folder loadable by ``AutoModelForCausalLM.from_pretrained``."""
        self.complete_pending()
        final = self.save_dir / FINAL_MODEL
        with self._one_line_when_full(FINAL_MODEL):
            tmp = self._fresh_tmp(FINAL_MODEL)
            if self.lora:
                if dist.get_rank() == 0:  # merging rewrites the weights in place: the run is over
                    merged = lora.merged_model(self.model.unwrap(unwrap_peft=False))
                    merged.save_pretrained(str(tmp), safe_serialization=True)
                    self.files.write(tmp)
            else:
                self._save_weights(tmp)
            self._every_write_durable(FINAL_MODEL)
        if dist.get_rank() == 0:
            _publish(tmp, final, self.trash)
        dist.barrier()
        return final

    def _every_write_durable(self, name: str) -> None:
        """Returns on every rank once every rank's files of checkpoint ``name`` are written (``--async_save``: the
        background writers done too) and, when the ranks run on several machines, flushed by each machine
        (:func:`flush_filesystem`); rank 0 then fsyncs the tree and publishes it. A flush that failed on any
        machine raises the same OSError on every rank (no rank is left waiting in a collective)."""
        self.booster.checkpoint_io._sync_io()  # background writers of --async_save (none otherwise)
        dist.barrier()  # every rank's shards and RNG are written
        if self.machines.count == 1:  # one machine: rank 0's fsync of the tree covers every rank's writes
            return
        started, failure = time.monotonic(), 0
        if self.machines.flushes:
            try:
                flush_filesystem(self.save_dir)
            except OSError as err:
                failure = err.errno or errno.EIO
        from colossalai.accelerator import get_accelerator

        device = get_accelerator().get_current_device()  # the collectives' device, as the training loop's
        flushed = torch.tensor([int(self.machines.flushes and not failure), int(failure > 0)], device=device)
        dist.all_reduce(flushed)  # a barrier that also tells every rank how it went on every machine
        worst = torch.tensor([failure], device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        done, failed = (int(v) for v in flushed.tolist())
        if failed:
            code = int(worst.item())
            raise OSError(code, f"{self.save_dir}: flushing {name} to the filesystem (syncfs) failed on {failed} of "
                                f"{self.machines.count} machines: {os.strerror(code)}")
        log.info("%s: %d machines flushed their writes to the filesystem (syncfs) in %.2f s", name, done,
                 time.monotonic() - started)

    def _fresh_tmp(self, name: str) -> Path:
        """A fresh empty ``save_dir/.tmp-<name>`` (rank 0 clears leftovers of a crashed save)."""
        tmp = self.save_dir / (TMP_PREFIX + name)
        if dist.get_rank() == 0:
            self.trash.discard(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        return tmp

    def _save_weights(self, directory: Path) -> None:
        """Replicated params: rank 0 writes safetensors with HF's ``save_pretrained`` (which handles tied
        embeddings; colossalai's safetensors writer refuses shared tensors). Sharded params (tp, gemini):
        colossalai gathers them into HF-style ``pytorch_model-*.bin`` shards plus an index. LoRA: only the
        trainable tensors (params are replicated under the plugins LoRA runs with)."""
        if self.lora:
            if dist.get_rank() == 0:
                lora.save_trainable(self.model.unwrap(unwrap_peft=False), directory)
        elif self.parallel.params_replicated:
            if dist.get_rank() == 0:
                self.model.unwrap().save_pretrained(str(directory), safe_serialization=True)
        else:
            self.booster.save_model(self.model, str(directory), shard=True, use_safetensors=False, size_per_shard=1024)
        if dist.get_rank() == 0:
            self.files.write(directory)

    def _save_optimizer(self, directory: Path) -> None:
        """ddp: one ``optimizer/optimizer.bin`` from rank 0 (its sharded loader needs CUDA synchronize, even on
        CPU); ZeRO / gemini / 3d: colossalai's per-rank shards + ``pytorch_optim.bin.index.json``."""
        if self.parallel.optimizer_replicated:
            if dist.get_rank() == 0:
                directory.mkdir(parents=True, exist_ok=True)
            self.booster.save_optimizer(self.optimizer, str(directory / "optimizer.bin"), shard=False,
                                        use_async=self.async_save)
        else:
            self.booster.save_optimizer(self.optimizer, str(directory), shard=True, use_async=self.async_save)

    # ------------------------------------------------------------------ loading
    def restore(self, target: Optional[LoadTarget]) -> Optional[RunningState]:
        """Apply a load target: weights only (returns None: a new stage starts fresh) or a full resume (returns
        the saved data position). A resumed checkpoint was checked by :func:`verify_checkpoint` already."""
        if target is None:
            return None
        self.load_weights(target.modeling_dir)
        if target.kind == "weights":
            log.info("loaded weights from %s (new stage: optimizer, schedule and data start fresh)", target.path)
            return None
        path = target.path
        state = read_running_state(path)
        single = path / "optimizer" / "optimizer.bin"
        wanted = settings_of(self.scheduler)  # this run's flags, before the checkpoint's values replace them
        self.booster.load_optimizer(self.optimizer, str(single if single.is_file() else path / "optimizer"))
        restore_master_weights(self.model, self.optimizer, path / "optimizer", self.parallel)
        restore_loss_scale(self.optimizer, path / "optimizer")
        self.booster.load_lr_scheduler(self.scheduler, str(path / "lr_scheduler"))
        changes, saved_lr, next_lr = follow_settings(self.scheduler, wanted)
        if changes:
            log.warning("the optimizer settings are not the checkpoint's (%s): this run's hold from step %d on (the "
                        "next step's lr %.4g; %.4g with the checkpoint's)", "; ".join(changes), state.step + 1,
                        next_lr, saved_lr)
        rng_file = path / "rng" / f"rank-{dist.get_rank():05d}.pt"
        if state.world_size == dist.get_world_size() and rng_file.is_file():
            restore_rng(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s: saved with %d ranks, running %d: RNG streams restart from the seed "
                        "(data position is exact)", path, state.world_size, dist.get_world_size())
        return state

    def load_weights(self, modeling_dir: Path, flag: str = "--load_checkpoint") -> None:
        """Load a HF folder into the boosted model (``flag``: the option that named it, for errors).

        Checked by name first, because HF folders of tied-embedding models (SmolLM2) omit ``lm_head.weight``:
        the only keys allowed to be missing are parameters that share storage with a stored one. Its files are
        checked for damage by rank 0 alone (a 70 B model's 30-280 files read by each of 512 ranks were up to
        143,000 header reads on one shared filesystem); a damaged one stops every rank with the same line.
        """
        on_rank0(lambda: verify_checkpoint_files(modeling_dir))
        if self.lora:
            lora.load_trainable(self.model.unwrap(unwrap_peft=False), modeling_dir)
            self._sync_master_weights()
            return
        saved = _saved_keys(modeling_dir, flag)
        tied = check_weight_names(set(self.files.state_keys), saved, self.files.config.tie_word_embeddings,
                                  f"{flag} {modeling_dir}")
        self.booster.load_model(self.model, str(weights_path(modeling_dir, flag)), strict=False)
        if tied - saved:
            self._tie_output_embedding(modeling_dir, flag, tied)

    def _tie_output_embedding(self, modeling_dir: Path, flag: str, tied: set) -> None:
        """A tied model's file has no ``lm_head.weight``. A pipeline splits the tie (the LM head lives on the last
        stage, the embedding on the first), so the last stage reads the embedding's tensor into its head itself;
        a model built eagerly got it from ``from_pretrained``, one built lazily would keep its random init."""
        model = self.model.unwrap()
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if head is None or head.weight is None or head.weight is embedding.weight:
            return
        (head_key,) = tied
        embedding_key = next(name for name in self.files.state_keys if name.endswith("embed_tokens.weight"))
        model.load_state_dict({head_key: _read_saved_tensor(modeling_dir, embedding_key, flag)}, strict=False)
        self._sync_master_weights()

    def _sync_master_weights(self) -> None:
        """After weights were written into the model directly: ZeRO / mixed precision keep fp32 copies of them."""
        sync_master = getattr(self.model, "update_master_params", None)
        if sync_master is not None:
            sync_master()

"""The run plan: facts of one training run that follow from the flags, the data, the plugin and the machine.

Written next to the flags in ``save_dir/train_config.json`` (and ``--config_file``) as
``{<every TrainConfig field>..., "plan": {<every RunPlan field>...}}``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from colossal_llama.training.config import TrainConfig
from colossal_llama.utils.json_files import write_json


@dataclass(frozen=True)
class RunPlan:
    # data and schedule
    total_steps: int  # optimizer steps this run walks to (num_epochs x steps_per_epoch, capped by --max_steps)
    steps_per_epoch: int
    global_batch: int  # sequences per optimizer step, all data-parallel ranks together
    dropped_per_epoch: int  # epoch tail smaller than a global batch, skipped (logged)
    # parallelism
    world_size: int
    dp_size: int
    plugin_class: str  # the colossalai plugin that really runs (TorchDDPPlugin, LowLevelZeroPlugin, ...)
    cpu_offload: bool
    tp_size: int  # tensor- and pipeline-parallel sizes of the plugin that runs
    pp_size: int
    sequence_parallelism: Optional[str]  # its sequence-parallel mode (split_gather, all_to_all, ...), None when off
    sp_size: int  # ranks that split a sequence in all_to_all / ring_attn (1 otherwise: the others use the tp group)
    # model
    attn_implementation: str
    liger: bool
    loss: str  # which code computes the loss (colossal_llama.training.model.LOSSES)
    loss_chunk_tokens: int  # scored_chunks: positions per LM-head call; 0 for the other losses
    num_parameters: int
    trainable_parameters: int

    @property
    def epoch_samples(self) -> int:
        return self.steps_per_epoch * self.global_batch + self.dropped_per_epoch


def write_run_config(cfg: TrainConfig, plan: RunPlan, path: Path) -> None:
    """Atomically write the resolved flags and the plan as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**dataclasses.asdict(cfg), "plan": dataclasses.asdict(plan)}, sort_keys=True)

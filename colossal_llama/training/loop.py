"""``train(cfg)``: build the run, restore a checkpoint if asked, walk the steps, save checkpoints and the model."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from colossal_llama.training import checkpoint as ckpt
from colossal_llama.training.collate import PackedCollator
from colossal_llama.training.config import TrainConfig, resolve_precision, resolve_schedule, write_config
from colossal_llama.training.data import (PreparedData, StepBatchSampler, check_manifest_against_model,
                                          collect_parts, expand_dataset_args, load_prepared)
from colossal_llama.training.distributed import init_distributed, setup_logging
from colossal_llama.training.metrics import RunMetrics, StepStats
from colossal_llama.training.model import (NEFTune, apply_liger_kernels, choose_attention, freeze_non_embeddings,
                                           load_causal_lm)
from colossal_llama.training.optim import WarmupCosineLR, build_optimizer
from colossal_llama.training.plugin import ParallelLayout, build_plugin, ddp_mixed_precision, parallel_layout
from colossal_llama.training.step import Stepper
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: TrainConfig
    data: PreparedData
    layout: ParallelLayout
    stepper: Stepper
    model_files: ckpt.ModelFiles
    collator: PackedCollator
    num_params: int
    cuda: bool

    def sampler(self, epoch: int, start_offset: int) -> StepBatchSampler:
        c = self.cfg
        return StepBatchSampler(self.data.bucket_sizes, c.batch_size, c.accumulation_steps, self.layout.dp_rank,
                                self.layout.dp_size, c.seed, c.shuffle_buckets, epoch, start_offset)


def load_data(cfg: TrainConfig, tokenizer, model_config) -> PreparedData:
    """Check every manifest against --pretrained before any model is built, then load the parts."""
    parts, manifests = collect_parts(expand_dataset_args(cfg.dataset))
    for manifest_path, manifest in manifests.items():
        check_manifest_against_model(manifest, manifest_path, tokenizer, model_config.vocab_size, cfg.max_length,
                                     cfg.pretrained)
    return load_prepared(parts, manifests)


def build_run(cfg: TrainConfig) -> Run:
    from colossalai.accelerator import get_accelerator
    from colossalai.booster import Booster
    from transformers import AutoConfig

    from colossal_llama.tokenizer.loading import load_tokenizer

    cuda = init_distributed(cfg.seed)
    cfg = resolve_precision(cfg, cuda)
    tokenizer = load_tokenizer(cfg.pretrained)
    model_config = AutoConfig.from_pretrained(cfg.pretrained)
    data = load_data(cfg, tokenizer, model_config)

    plugin = build_plugin(cfg, cuda)
    layout = parallel_layout(plugin)
    probe = StepBatchSampler(data.bucket_sizes, cfg.batch_size, cfg.accumulation_steps, layout.dp_rank,
                             layout.dp_size, cfg.seed, cfg.shuffle_buckets)
    if probe.steps_per_epoch == 0:
        raise UserInputError(f"--dataset holds {sum(data.bucket_sizes)} sequences, fewer than one global batch "
                                  f"({probe.global_batch} = batch_size x accumulation_steps x {layout.dp_size} dp ranks)")
    total_steps = cfg.num_epochs * probe.steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    attn = choose_attention(cfg.use_flash_attn, cuda)
    cfg = resolve_schedule(cfg, total_steps)
    cfg = dataclasses.replace(cfg, extra={**cfg.extra, "attn_implementation": attn, "dp_size": layout.dp_size,
                                          "liger": apply_liger_kernels(cfg.liger, cuda),
                                          "global_batch": probe.global_batch,
                                          "steps_per_epoch": probe.steps_per_epoch,
                                          "dropped_per_epoch": probe.dropped_per_epoch})
    log.info("data: %d sequences in %d buckets, global batch %d -> %d steps/epoch, %d steps total; "
             "%d sequences/epoch skipped (epoch tail smaller than a global batch)",
             sum(data.bucket_sizes), len(data.bucket_sizes), probe.global_batch, probe.steps_per_epoch, total_steps,
             probe.dropped_per_epoch)
    log.info("plugin %s, precision %s, attention %s, world %d (dp %d)", cfg.plugin, cfg.mixed_precision, attn,
             dist.get_world_size(), layout.dp_size)
    if dist.get_rank() == 0:
        write_config(cfg, Path(cfg.save_dir) / "train_config.json")
        if cfg.config_file:
            write_config(cfg, Path(cfg.config_file))

    model = load_causal_lm(cfg.pretrained, attn)
    model.config.use_cache = False
    if cfg.use_grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    num_params = sum(p.numel() for p in model.parameters())
    if cfg.freeze_non_embeds_params:
        log.info("--freeze_non_embeds_params: %d of %d parameters train", freeze_non_embeddings(model), num_params)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cuda)
    scheduler = WarmupCosineLR(optimizer, cfg.warmup_steps, total_steps)
    booster = Booster(plugin=plugin, mixed_precision=ddp_mixed_precision(cfg))
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)

    stepper = Stepper(booster, model, optimizer, scheduler, layout, get_accelerator().get_current_device(),
                      cfg.grad_clip, manual_clip=cfg.plugin == "ddp", use_no_sync=cfg.plugin == "ddp",
                      autocast_dtype=torch.bfloat16 if cfg.plugin == "ddp" and cfg.mixed_precision == "bf16" else None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = PackedCollator(pad_id if pad_id is not None else 0, cfg.max_length, cfg.padding_mode,
                              mask_4d=attn != "flash_attention_2")
    return Run(cfg, data, layout, stepper, ckpt.ModelFiles(model_config, tokenizer, data.chat_template), collator,
               num_params, cuda)


def restore(run: Run) -> ckpt.RunningState:
    """Apply ``--load_checkpoint``; returns where training starts."""
    cfg, s = run.cfg, run.stepper
    start = ckpt.RunningState(epoch=0, step=0, sample_offset=0, global_batch=run.sampler(0, 0).global_batch,
                              world_size=dist.get_world_size())
    target = ckpt.resolve_load_target(cfg.load_checkpoint, Path(cfg.save_dir))
    if target is None:
        return start
    if target.kind == "weights":
        ckpt.load_weights(s.booster, s.model, target.path)
        log.info("loaded weights from %s (new stage: optimizer, schedule and data start fresh)", target.path)
        return start
    state = ckpt.load_checkpoint(s.booster, s.model, s.optimizer, s.scheduler, target.path)
    if state.global_batch != start.global_batch:
        log.warning("global batch changed from %d to %d: resuming at sample %d of epoch %d",
                    state.global_batch, start.global_batch, state.sample_offset, state.epoch)
    log.info("resumed from %s: epoch %d, step %d, sample offset %d", target.path, state.epoch, state.step,
             state.sample_offset)
    return dataclasses.replace(state, global_batch=start.global_batch, world_size=start.world_size)


def micro_batch_groups(run: Run, epoch: int, offset: int) -> Iterator[List[dict]]:
    """The rest of ``epoch`` from ``offset``, as lists of ``accumulation_steps`` collated micro-batches."""
    loader = DataLoader(run.data.dataset, batch_sampler=run.sampler(epoch, offset), collate_fn=run.collator,
                        num_workers=0)
    group: List[dict] = []
    for batch in loader:
        group.append(batch)
        if len(group) == run.cfg.accumulation_steps:
            yield group
            group = []


def train(cfg: TrainConfig) -> Optional[Path]:
    """Train per ``cfg``; returns the final HF model dir (``save_dir/modeling``)."""
    setup_logging()
    run = build_run(cfg)
    cfg, s = run.cfg, run.stepper
    state = restore(run)
    total = cfg.extra["total_steps"]
    steps_per_epoch = cfg.extra["steps_per_epoch"]
    if cfg.use_neft:
        NEFTune(cfg.neft_alpha).attach(s.model.unwrap())
    s.model.train()
    save_dir = Path(cfg.save_dir)
    metrics = RunMetrics(dist.get_rank() == 0, save_dir, cfg.tensorboard_dir, total, state.step, cfg.log_interval,
                         run.num_params, run.cuda)
    try:
        while state.step < total and state.epoch < cfg.num_epochs:
            epoch = state.epoch
            for group in micro_batch_groups(run, epoch, state.sample_offset):
                result = s.step(group)
                state.step += 1
                state.sample_offset += state.global_batch
                metrics.record(StepStats(state.step, epoch, result.loss, result.lr, result.grad_norm, result.tokens,
                                         result.seconds))
                if state.sample_offset >= steps_per_epoch * state.global_batch:  # epoch done: the next starts at 0
                    state.epoch, state.sample_offset = epoch + 1, 0
                if state.step % cfg.save_interval == 0 or state.step == total:
                    path = ckpt.save_checkpoint(s.booster, s.model, s.optimizer, s.scheduler, save_dir, state,
                                                run.model_files)
                    log.info("saved checkpoint %s", path)
                if state.step >= total:
                    break
            if state.step < total and state.epoch == epoch:  # resumed past the last full global batch
                state.epoch, state.sample_offset = epoch + 1, 0
    finally:
        metrics.close()
    final = ckpt.save_final_model(s.booster, s.model, save_dir, run.model_files)
    log.info("saved the trained model (HF format) to %s", final)
    return final

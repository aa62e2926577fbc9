"""``train(cfg)``: build the run, restore a checkpoint if asked, walk the steps, save checkpoints and the model."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from colossal_llama.model.scored_loss import install_scored_loss
from colossal_llama.training.attention import choose_attention, needs_dense_mask
from colossal_llama.training.checkpoint import (TMP_PREFIX, Checkpointer, LoadTarget, Machines, ModelFiles,
                                                RunningState, check_lora_matches, check_same_model, check_same_stage,
                                                latest_checkpoint, read_running_state, resolve_load_target,
                                                set_aside_newer_checkpoints, verify_checkpoint)
from colossal_llama.training.collate import PackedCollator
from colossal_llama.training.config import TrainConfig, resolve_for_device, resolve_warmup, validation_interval
from colossal_llama.training.data import PreparedData, RowsWithCategory, StepBatchSampler, ends_epoch
from colossal_llama.training.inputs import RunInputs, epoch_order_changes, epoch_order_inputs, load_inputs
from colossal_llama.training.disk_space import CheckpointRoom, checkpoint_estimate
from colossal_llama.training.distributed import (host_memory_peaks_gib, init_distributed, on_rank0, setup_logging,
                                                 shutdown)
from colossal_llama.training.metrics import RunMetrics, StepStats
from colossal_llama.training.lora import apply_lora, vocabulary_was_expanded
from colossal_llama.training.model import (LOSSES, NEFTune, apply_liger_kernels, choose_loss, count_parameters,
                                           freeze_non_embeddings, holds_no_weights, load_causal_lm)
from colossal_llama.training.optim import WarmupCosineLR, build_optimizer
from colossal_llama.training.peer_watch import PeerWatch
from colossal_llama.training.plan import RunPlan, write_run_config
from colossal_llama.training.plugin import Parallelism, build_parallel
from colossal_llama.training.run_dir import (RUN_CONFIG, SaveDirLock, SaveDirRequest, claim_save_dir, claimed_before,
                                             job_store, record_claim, record_stop, release_lock, run_inputs)
from colossal_llama.training.step import NonFiniteStep, Stepper
from colossal_llama.training.stop_signals import StoppedBySignal, StopRequest, leave_on_silence
from colossal_llama.training.trash import Trash
from colossal_llama.training.validation import Validator
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: TrainConfig  # resolved (precision, warm-up)
    plan: RunPlan
    inputs: RunInputs
    parallel: Parallelism
    stepper: Stepper
    checkpointer: Checkpointer
    collator: PackedCollator
    validator: Optional[Validator]
    target: Optional[LoadTarget]  # what --load_checkpoint resolved to
    lock: Optional[SaveDirLock]  # held by global rank 0 for the life of the run
    cuda: bool
    peers: Optional[PeerWatch]  # every rank's heartbeat (None in a world of one or with --rank_silence_s 0)

    @property
    def data(self) -> PreparedData:
        return self.inputs.train

    def sampler(self, epoch: int, start_offset: int) -> StepBatchSampler:
        c, layout = self.cfg, self.parallel.layout
        return StepBatchSampler(self.data.bucket_sizes, c.batch_size, c.accumulation_steps, layout.dp_rank,
                                layout.dp_size, c.seed, c.shuffle_buckets, epoch, start_offset, self.inputs.mixture)


def claim(cfg: TrainConfig, trash: Trash) -> tuple[Optional[LoadTarget], Optional[SaveDirLock]]:
    """Collective, before anything is built: rank 0 locks --save_dir and refuses to clobber an earlier run (what
    it removes goes to ``trash``); then --load_checkpoint is resolved and a checkpoint to resume is checked for
    damaged files; what it holds must agree with this run's --lora_rank and be of --pretrained's shapes. A failure
    after the lock releases it (no record of a crashed run is left for the next run)."""
    save_dir = Path(cfg.save_dir)
    job = {}  # rank 0's: the launcher's store, and whether this job claimed the save dir before a torchrun restart

    def lock_save_dir() -> SaveDirLock:
        job["store"] = job_store()
        job["restarted"] = claimed_before(job["store"], save_dir)
        target = resolve_load_target(cfg.load_checkpoint, save_dir, job["restarted"])
        request = SaveDirRequest(cfg.load_checkpoint, target, job["restarted"], run_inputs(cfg))
        return claim_save_dir(save_dir, request, cfg.overwrite, trash)

    lock = on_rank0(lock_save_dir)
    try:
        target = _check_load_target(cfg, save_dir, job)
    except BaseException:
        if lock is not None:
            release_lock(lock)
        raise
    return target, lock


def _check_load_target(cfg: TrainConfig, save_dir: Path, job: dict) -> Optional[LoadTarget]:
    """Collective, holding the save dir: resolve, check and set up what --load_checkpoint names (``job``: rank 0's
    store and restart, from the claim); the claim is recorded in the store once it is all done."""
    # after the claim ("latest" must not see what --overwrite removed); rank 0's answer for all: the ranks of
    # another machine may list the save dir as it was before the newest checkpoint was published
    target, restarted = on_rank0(lambda: _resolve_after_claim(cfg, save_dir, job["restarted"]), shared=True)
    if target is not None and target.kind == "resume":
        on_rank0(lambda: verify_checkpoint(target.path))
    if target is not None:
        on_rank0(lambda: check_lora_matches(target, cfg.lora_rank))
        on_rank0(lambda: check_same_model(target.modeling_dir, cfg.pretrained))
    if newer_checkpoints_go_aside(target, restarted):  # once the resumed checkpoint passed its checks
        on_rank0(lambda: set_aside_newer_checkpoints(target.path, save_dir))
    on_rank0(lambda: record_claim(job["store"], save_dir))
    return target


def _resolve_after_claim(cfg: TrainConfig, save_dir: Path, restarted: bool) -> tuple[Optional[LoadTarget], bool]:
    """Rank 0: the load target, and whether this is a restart of a job that claimed the save dir before."""
    target = resolve_load_target(cfg.load_checkpoint, save_dir, restarted)
    named = None if cfg.load_checkpoint in (None, "latest") else Path(cfg.load_checkpoint)
    if restarted and target is not None and cfg.load_checkpoint != "latest" and target.path != named:
        log.info("torchrun restart: resuming from %s, this job's newest checkpoint since %s", target.path,
                 f"--load_checkpoint {named}" if named is not None else "its start")
    return target, restarted


def newer_checkpoints_go_aside(target: Optional[LoadTarget], restarted: bool, environ=os.environ) -> bool:
    """Whether a resume sets the save dir's checkpoints newer than ``target`` aside: yes, except in a torchrun
    restart, whose newer checkpoints are the job's own: one of a job that claimed the save dir before
    (``restarted``), or any incarnation after the first where torchrun's store could not say (a refused first
    start never set anything up to lose)."""
    return (target is not None and target.kind == "resume" and not restarted
            and environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")


def build_run(cfg: TrainConfig) -> Run:
    cuda = init_distributed(cfg.seed, cfg.dist_timeout_minutes)
    cfg = resolve_for_device(cfg, cuda)
    trash = Trash(TMP_PREFIX)
    target, lock = (None, None) if cfg.benchmark else claim(cfg, trash)
    try:
        return _build_claimed_run(cfg, cuda, trash, target, lock)
    except BaseException:
        if lock is not None:  # rank 0's: a start that failed leaves no record of a crashed run for the next one
            release_lock(lock)
        raise


def _build_claimed_run(cfg: TrainConfig, cuda: bool, trash: Trash, target: Optional[LoadTarget],
                       lock: Optional[SaveDirLock]) -> Run:
    """The rest of :func:`build_run`, once the save dir is claimed: model, data, plugin, optimizer, checkpointer."""
    from colossalai.accelerator import get_accelerator
    from colossalai.booster import Booster
    from transformers import AutoConfig

    from colossal_llama.tokenizer.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.pretrained)
    pad_id = pad_token_id(tokenizer, cfg.pad_token)
    model_config = AutoConfig.from_pretrained(cfg.pretrained)
    inputs = load_inputs(cfg, tokenizer, model_config.vocab_size)
    data = inputs.train

    parallel = build_parallel(cfg, cuda)
    resumed = read_running_state(target.path) if target is not None and target.kind == "resume" else None
    if resumed is not None:
        check_same_stage(target, getattr(data.manifest, "kind", None))
    cfg, steps = _plan_steps(cfg, data, parallel, resumed)
    attn = choose_attention(cfg.attention, cuda, cfg.use_flash_attn, parallel.dense_mask_only)
    liger = apply_liger_kernels(cfg.liger, cuda, parallel.forward_is_the_models)
    loss, loss_chunk = choose_loss(cfg.loss_chunk_tokens, liger, parallel.forward_is_the_models,
                                   model_config.vocab_size)
    device = get_accelerator().get_current_device()
    peers = PeerWatch.start(cfg.rank_silence_s, device)
    if peers is not None:  # a rank dying while the others load the model or a checkpoint: they leave too
        peers.listen((), functools.partial(leave_on_silence, peers))
    model = _build_model(cfg, attn, parallel, device, loss_chunk)
    built_lazily = holds_no_weights(model)  # what was built, for the log (not what the plan asked for)
    model_files = ModelFiles(model_config, tokenizer, data.chat_template, frozenset(model.state_dict()))
    num_params = count_parameters(model)
    model, trainable = _choose_trainable(cfg, model)
    plan = RunPlan(**steps, world_size=dist.get_world_size(), dp_size=parallel.layout.dp_size,
                   plugin_class=parallel.plugin_class, cpu_offload=parallel.cpu_offload, **parallel.sizes,
                   attn_implementation=attn,
                   liger=liger, loss=loss, loss_chunk_tokens=loss_chunk, num_parameters=num_params,
                   trainable_parameters=trainable)
    _log_plan(cfg, plan, data)
    if dist.get_rank() == 0 and not cfg.benchmark:
        write_run_config(cfg, plan, Path(cfg.save_dir) / RUN_CONFIG)
    if dist.get_rank() == 0 and cfg.config_file:
        write_run_config(cfg, plan, Path(cfg.config_file))

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cuda)
    scheduler = WarmupCosineLR(optimizer, cfg.warmup_steps, plan.total_steps)
    booster = Booster(plugin=parallel.plugin, mixed_precision=parallel.booster_mixed_precision)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)

    neftune = NEFTune(cfg.neft_alpha, cfg.seed, parallel.layout.dp_rank) if cfg.use_neft else None
    if neftune is not None:  # on the peft model itself under LoRA (colossalai's unwrap hides it by default)
        neftune.attach(model.unwrap(unwrap_peft=False) if cfg.lora_rank else model.unwrap())
    stepper = Stepper(booster, model, optimizer, scheduler, parallel, device,
                      cfg.grad_clip, neftune, num_categories=len(data.categories))
    if peers is not None:  # a rank judges a silent peer only while its own training stands still
        stepper.on_progress = peers.progressed
    room = CheckpointRoom(Path(cfg.save_dir), checkpoint_estimate(num_params, trainable, parallel.param_dtype.itemsize,
                                                                 lora=cfg.lora_rank > 0,
                                                                 master_weights=parallel.saves_master_weights))
    if dist.get_rank() == 0 and not cfg.benchmark:
        room.report_at_start()
    checkpointer = Checkpointer(booster, model, optimizer, scheduler, parallel, Path(cfg.save_dir), model_files, trash,
                                room, lora=cfg.lora_rank > 0, keep_last_k=cfg.keep_last_k, async_save=cfg.async_save,
                                machines=Machines.of_world())
    if parallel.lazy_init and target is None:  # built without weights; a load target brings its own
        checkpointer.load_weights(Path(cfg.pretrained), flag="--pretrained")
    largest, rank, smallest = host_memory_peaks_gib(device)
    log.info("model ready: host memory peak %.2f GiB (rank %d; smallest %.2f GiB), built in %s%s", largest, rank,
             smallest, str(parallel.param_dtype).removeprefix("torch."),
             ", lazily: each rank materialised only its part" if built_lazily else
             (" on the GPU" if parallel.build_on_device else ""))
    collator = PackedCollator(pad_id, cfg.max_length, cfg.padding_mode, mask_4d=needs_dense_mask(attn),
                              pad_multiple=parallel.sequence_multiple, additive_mask_dtype=parallel.additive_mask_dtype)
    validator = None
    if inputs.eval is not None:
        validator = Validator(inputs.eval.dataset, [inputs.eval.categories[c] for c in inputs.eval.row_category],
                              tokenizer, collator, stepper, cfg.batch_size, cfg.eval_batches)
        log.info("validation: %d batches of the held-out data (%s) every %d steps", len(validator.plan),
                 ", ".join(validator.categories), validation_interval(cfg))
        left_out = validator.left_out_note()
        if left_out:
            log.warning("%s", left_out)
    return Run(cfg, plan, inputs, parallel, stepper, checkpointer, collator, validator, target, lock, cuda, peers)


def pad_token_id(tokenizer, pad_token: str) -> int:
    """The id ``--pad_token`` names. Padding is never attended to nor trained on. Unlike the original, the saved
    tokenizer is left as it was: its pad token is part of the fingerprint that data prepared for it carries, so
    changing it would make the next stage refuse that data."""
    token = tokenizer.eos_token if pad_token == "eos" else tokenizer.unk_token
    if token is None:
        raise UserInputError(f"--pad_token {pad_token}: the tokenizer of this model has no {pad_token} token")
    return tokenizer.convert_tokens_to_ids(token)


def _plan_steps(cfg: TrainConfig, data: PreparedData, parallel: Parallelism,
                resumed: Optional[RunningState]) -> tuple[TrainConfig, dict]:
    """Steps per epoch and in all (``--max_steps`` caps them), and the warm-up they imply."""
    layout = parallel.layout
    probe = StepBatchSampler(data.bucket_sizes, cfg.batch_size, cfg.accumulation_steps, layout.dp_rank,
                             layout.dp_size, cfg.seed, cfg.shuffle_buckets)
    if probe.steps_per_epoch == 0:
        raise UserInputError(f"--dataset holds {sum(data.bucket_sizes)} sequences, fewer than one global batch "
                             f"({probe.global_batch} = batch_size x accumulation_steps x {layout.dp_size} dp ranks)")
    total_steps = steps_in_all(cfg.num_epochs, probe.epoch_samples, probe.global_batch, resumed)
    if cfg.max_steps is not None and cfg.max_steps > total_steps:
        log.warning("--max_steps %d: --num_epochs %d of this data holds %d steps (%d an epoch): the run ends there; "
                    "raise --num_epochs to train longer", cfg.max_steps, cfg.num_epochs, total_steps,
                    probe.steps_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if resumed is not None and resumed.step >= total_steps:
        log.warning("the checkpoint is at step %d and this run has %d steps in all: nothing is left to train (the "
                    "final model is its weights); raise --num_epochs or --max_steps to train on", resumed.step,
                    total_steps)
    return resolve_warmup(cfg, total_steps), dict(
        total_steps=total_steps, steps_per_epoch=probe.steps_per_epoch, global_batch=probe.global_batch,
        dropped_per_epoch=probe.dropped_per_epoch)


def steps_in_all(num_epochs: int, epoch_samples: int, global_batch: int, resumed: Optional[RunningState]) -> int:
    """Optimizer steps of the whole run: ``num_epochs`` of full global batches. Resumed from a checkpoint of
    another global batch (another number of ranks), its steps so far were of the old size and the rest of the
    data is counted in the new one (the epochs' count of the new size alone would end the run early, leaving
    data untrained, or late)."""
    per_epoch = epoch_samples // global_batch
    if resumed is None or resumed.global_batch == global_batch:
        return num_epochs * per_epoch
    if resumed.epoch >= num_epochs:
        return resumed.step
    left = max(0, epoch_samples - resumed.sample_offset) // global_batch
    return resumed.step + left + (num_epochs - resumed.epoch - 1) * per_epoch


def _build_model(cfg: TrainConfig, attn: str, parallel: Parallelism, device: torch.device, loss_chunk: int):
    """The model to boost; ``loss_chunk`` > 0: its loss runs the LM head on scored positions in chunks of that
    many (before LoRA wraps it, so the adapters' forward calls it)."""
    model = load_causal_lm(cfg.pretrained, attn, parallel.param_dtype,
                           device if parallel.build_on_device else None, lazy=parallel.lazy_init)
    model.config.use_cache = False
    if loss_chunk:
        install_scored_loss(model, loss_chunk)
    if cfg.use_grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_rank:  # frozen inputs to checkpointed blocks still need a graph for the adapters inside
            model.enable_input_require_grads()
    return model


def _choose_trainable(cfg: TrainConfig, model) -> tuple[object, int]:
    """Freeze per --freeze_non_embeds_params or wrap in LoRA adapters; returns (model, trainable parameters)."""
    if cfg.freeze_non_embeds_params:
        return model, freeze_non_embeddings(model)
    if cfg.lora_rank:
        embeddings = (cfg.lora_train_embeddings == "on" or
                      (cfg.lora_train_embeddings == "auto" and vocabulary_was_expanded(Path(cfg.pretrained))))
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                           train_embeddings=embeddings)
        log.info("LoRA rank %d on %s%s", cfg.lora_rank, ", ".join(cfg.lora_target_modules),
                 "; embed_tokens and lm_head train in full" if embeddings else "")
    return model, count_parameters(model, trainable_only=True)


def _log_plan(cfg: TrainConfig, plan: RunPlan, data: PreparedData) -> None:
    log.info("data: %d sequences in %d buckets, global batch %d -> %d steps/epoch, %d steps total; "
             "%d sequences/epoch skipped (epoch tail smaller than a global batch)",
             sum(data.bucket_sizes), len(data.bucket_sizes), plan.global_batch, plan.steps_per_epoch,
             plan.total_steps, plan.dropped_per_epoch)
    log.info("plugin %s (%s%s), precision %s, attention %s, loss %s, world %d (dp %d), %d of %d parameters train",
             cfg.plugin, plan.plugin_class, ", optimizer offloaded to CPU" if plan.cpu_offload else "",
             cfg.mixed_precision, plan.attn_implementation, _loss_words(plan), plan.world_size, plan.dp_size,
             plan.trainable_parameters, plan.num_parameters)


def _loss_words(plan: RunPlan) -> str:
    chunks = f", {plan.loss_chunk_tokens} per LM-head call" if plan.loss_chunk_tokens else ""
    return LOSSES[plan.loss] + chunks


def start_state(run: Run) -> RunningState:
    """Where training starts: step 0, or the data position of the resumed checkpoint."""
    fresh = RunningState(epoch=0, step=0, sample_offset=0, global_batch=run.plan.global_batch,
                         world_size=run.plan.world_size, data_order=epoch_order_inputs(run.cfg, run.inputs))
    state = run.checkpointer.restore(run.target)
    if state is None:
        return fresh
    if state.global_batch != fresh.global_batch:
        log.warning("global batch changed from %d to %d: resuming at sample %d of epoch %d",
                    state.global_batch, fresh.global_batch, state.sample_offset, state.epoch)
    changes = epoch_order_changes(state.data_order, fresh.data_order) if state.data_order else []
    if changes:
        log.warning("the epoch order is not the checkpoint's (%s): its %d sequences of epoch %d are counted in the "
                    "new order, so some may come again and others not at all this epoch (to go on exactly, resume "
                    "with the checkpoint's seed, data and weights)", "; ".join(changes), state.sample_offset,
                    state.epoch)
    log.info("resumed from %s: epoch %d, step %d, sample offset %d", run.target.path, state.epoch, state.step,
             state.sample_offset)
    return dataclasses.replace(state, global_batch=fresh.global_batch, world_size=fresh.world_size,
                               data_order=fresh.data_order)


def micro_batch_groups(run: Run, epoch: int, offset: int) -> Iterator[List[dict]]:
    """The rest of ``epoch`` from ``offset``, as lists of ``accumulation_steps`` collated micro-batches."""
    # A generator of its own: creating the iterator draws a seed from it, not from torch's global RNG (whose
    # state checkpoints save), so a resumed run's random stream is the uninterrupted run's.
    rows = RowsWithCategory(run.data) if run.data.categories else run.data.dataset
    loader = DataLoader(rows, batch_sampler=run.sampler(epoch, offset), collate_fn=run.collator,
                        num_workers=0, generator=torch.Generator().manual_seed(run.cfg.seed))
    group: List[dict] = []
    for batch in loader:
        group.append(batch)
        if len(group) == run.cfg.accumulation_steps:
            yield group
            group = []


def train(cfg: TrainConfig) -> Optional[Path]:
    """Train per ``cfg``, then leave the process group; returns the final HF model dir (``save_dir/modeling``).
    Raises :class:`StoppedBySignal` on every rank when a signal of ``--stop_signals`` stopped the run (after its
    checkpoint).

    Rank 0 waits for its background deletions only after the last collective (no rank waits for them), and keeps
    the save dir locked until they are done."""
    setup_logging()
    run = build_run(cfg)
    try:
        try:
            final = _train(run)
        except StoppedBySignal:
            _leave(run)  # every rank agreed to stop and is here: the barrier cannot hang
            raise
        _leave(run)
        return final
    finally:
        if run.peers is not None:
            run.peers.close()
        if run.lock is not None:
            release_lock(run.lock)


def _leave(run: Run) -> None:
    """Only after success or an agreed stop: a barrier with a crashed peer would hang (torchrun stops the others)."""
    shutdown()
    run.checkpointer.trash.wait()


def checkpoint_due(step: int, total_steps: int, save_interval: int, epoch_done: bool, skip_save_each_epoch: bool) -> bool:
    """After optimizer step ``step``: every ``save_interval`` steps, at the last step, and at the end of every
    epoch unless ``--skip_save_each_epoch``."""
    return step % save_interval == 0 or step == total_steps or (epoch_done and not skip_save_each_epoch)


def _train(run: Run) -> Optional[Path]:
    state = start_state(run)
    run.stepper.model.train()
    saving = not run.cfg.benchmark  # a benchmark writes neither checkpoints nor a model
    stop = StopRequest(run.cfg.stop_signals, run.peers)
    stop.install()  # before: a signal kills at once (nothing trained yet)
    try:
        _walk_steps(run, state, stop, saving)
        if not saving:
            return None
        final = run.checkpointer.save_final()  # a signal now is too late to stop anything: the run ends anyway
        log.info("saved the trained model (HF format) to %s", final)
        return final
    finally:
        stop.uninstall()


def _walk_steps(run: Run, state: RunningState, stop: StopRequest, saving: bool) -> None:
    """The steps from ``state`` to the end; raises :class:`StoppedBySignal` when the ranks agreed to stop."""
    cfg, plan = run.cfg, run.plan
    metrics = RunMetrics(dist.get_rank() == 0, Path(cfg.save_dir) if saving else None, cfg.tensorboard_dir,
                         plan.total_steps, state.step, 1 if cfg.benchmark else cfg.log_interval,
                         plan.num_parameters, run.cuda, run.data.categories, state.category_tokens,
                         devices=plan.world_size)
    try:
        if run.validator is not None and (state.step == 0 or state.validation_due):
            _validate_first(run, state, metrics)
        state.validation_due = False
        if stop.agreed(run.stepper.device):  # came during start-up validation: nothing trained, nothing to save
            _stop(run, stop, state, saved=True)
        while state.step < plan.total_steps and state.epoch < cfg.num_epochs:
            epoch = state.epoch
            for group in micro_batch_groups(run, epoch, state.sample_offset):
                try:
                    result = run.stepper.step(group, state.step + 1, lambda: stop.vote)
                except NonFiniteStep as broken:  # on every rank (the step's loss and norm are global)
                    run.checkpointer.complete_pending()  # --async_save: the last good checkpoint, published
                    raise _diverged_error(broken, run.cfg, saving) from None
                state.step += 1
                state.sample_offset += state.global_batch
                metrics.record(StepStats(state.step, epoch, result.loss, result.lr, result.grad_norm, result.tokens,
                                         result.seconds, result.category_tokens))
                state.category_tokens = metrics.category_totals()
                epoch_done = ends_epoch(state.sample_offset, state.global_batch, plan.epoch_samples)
                if epoch_done:  # the next step starts the next epoch at its first sample
                    state.epoch, state.sample_offset = epoch + 1, 0
                _after_step(run, state, metrics, epoch_done, result.stop_votes > 0, stop, saving)
                if state.step >= plan.total_steps:
                    break
            if state.step < plan.total_steps and state.epoch == epoch:  # resumed past the last full global batch
                state.epoch, state.sample_offset = epoch + 1, 0
    finally:
        metrics.close()


def _validate_first(run: Run, state: RunningState, metrics: RunMetrics) -> None:
    """The validation before this process's first step (step 0's, or the one a stop left to the resume)."""
    if run.parallel.first_iteration_trains:
        log.warning("--plugin gemini_auto: no validation before the first step of a run (its memory tracer needs a "
                    "training iteration first); the next is after step %d", _next_eval_step(run, state.step))
        return
    metrics.record_eval(state.step, run.validator.run())


def _next_eval_step(run: Run, step: int) -> int:
    interval = validation_interval(run.cfg)
    return min((step // interval + 1) * interval, run.plan.total_steps)


def _diverged_error(broken: NonFiniteStep, cfg: TrainConfig, saving: bool) -> UserInputError:
    """The one line a run stops with when a step's loss or gradient norm is not finite: nothing of that step is
    recorded or saved, so every checkpoint holds finite weights; it names the newest one to go back to."""
    applied = ("the optimizer had applied it (the plugin measures the norm inside its step), so the run stops "
               "without saving anything of it" if broken.applied else
               "the run stops before the optimizer applies it, and saves nothing of it")
    newest = latest_checkpoint(Path(cfg.save_dir)) if saving else None
    back = (f"The newest checkpoint is {newest}: resume from it (--load_checkpoint {newest})" if newest else
            "No checkpoint was saved before it: start again")
    return UserInputError(f"step {broken.step}: {broken}: the run diverged (or this step's data broke it); {applied}. "
                          f"{back} with a lower --lr (now {cfg.lr:g}) or more --warmup_steps (now {cfg.warmup_steps})")


def _after_step(run: Run, state: RunningState, metrics: RunMetrics, epoch_done: bool, stopping: bool,
                stop: StopRequest, saving: bool) -> None:
    """Validation and a checkpoint when due, then the stop once the ranks agreed to one: ``stopping`` (the step's
    all-reduce carried a vote), or a signal that came during the validation or the save (either can take minutes)."""
    cfg, plan = run.cfg, run.plan
    validated = saved = False
    eval_due = state.step % validation_interval(cfg) == 0 or state.step == plan.total_steps
    if run.validator is not None and eval_due:
        if stopping:  # the stop comes first (a scheduler's grace period is short); the resumed run validates
            state.validation_due = True
        else:
            metrics.record_eval(state.step, run.validator.run())
            validated = True
    if saving and (stopping or checkpoint_due(state.step, plan.total_steps, cfg.save_interval, epoch_done,
                                              cfg.skip_save_each_epoch)):
        log.info("saved checkpoint %s", run.checkpointer.save(state))
        saved = True
    if stopping or ((validated or saved) and stop.agreed(run.stepper.device)):
        _stop(run, stop, state, saved=saved or not saving)


def _stop(run: Run, stop: StopRequest, state: RunningState, saved: bool) -> None:
    """Collective, once the ranks agreed to stop: save a checkpoint of this step unless ``saved`` (already, or
    nothing to save), then raise :class:`StoppedBySignal` on every rank."""
    if not saved:
        log.info("saved checkpoint %s", run.checkpointer.save(state))
    run.checkpointer.complete_pending()  # --async_save: the stop's checkpoint is published before the run leaves
    stopped, seconds = stop.stopped(state.step, run.stepper.device)
    if dist.get_rank() == 0:  # every rank is here: no collective waits on rank 0's store call
        record_stop(job_store(), stopped.signum)
    log.warning("stopped by %s after step %d of %d, %.1f s after the signal, exit code %d: resume with "
                "--load_checkpoint latest", stopped.signal_name, state.step, run.plan.total_steps, seconds,
                stopped.exit_code)
    raise stopped

"""Self-replay: text sampled from the base model itself, to mix into continual pre-training on a new language.

Training on a new language moves a model away from what it knew. Replaying data of the old distribution holds it
back, but a team rarely has its base model's pre-training data. The base model can write samples of that distribution:
unconditional samples from the document start, at temperature 1 with no top-k/top-p cut (the model's own
distribution, not its most likely text). Trained on as a share of every batch (``train.py --dataset
new_data:0.8 replay:0.2``), their loss is the cross-entropy to the base's distribution, so they pull the model
back wherever it drifted, in every domain the base covered, without any of its data. Measured on a CPU proxy of
the recipe (README, GPU section): English bits/char +1.4 % without replay, -0.9 % with a 20 % share.

Output: ``OUTPUT_DIR/self_replay.jsonl``, pre-training rows ``{"source": "", "target": text, "category": C}``
for ``prepare_pretrain_dataset.py --data_input_dirs OUTPUT_DIR``. Batch k is drawn after seeding with
``(seed, k)``: the same texts for the same settings on the same kind of device, however the work is split.

At scale (a 7B model, millions of tokens to replay) the batches are split over processes: under ``torchrun`` /
``colossalai run`` (``WORLD_SIZE``/``RANK``, or ``--num_shards``/``--shard_index``) shard i of N draws the batches
k with ``k % N == i``, on its own GPUs with ``--device auto`` or ``cuda`` (:mod:`.placement`), and writes
``OUTPUT_DIR/self_replay.shard-IIIII-of-NNNNN.jsonl`` (published by a rename when complete); the N files together
hold exactly the texts of a 1-shard run. Such a job runs for hours: killed, the same command goes on from the last
batch on disk and writes the file an uninterrupted run writes (:class:`ReplayOutput`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from colossal_llama.dataset.config import SHARD_DIR, Shard, check_one_run_per_folder
from colossal_llama.inference.generation import cut_at_stop, decode_reply
from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from, flag
from colossal_llama.utils.errors import UserInputError, cli_entry

log = logging.getLogger(__name__)
OUTPUT_FILE = "self_replay.jsonl"
SHARD_FILE = "self_replay.{shard}.jsonl"  # shard: Shard.dir_name, shard-IIIII-of-NNNNN
SHARD_FILE_RE = re.compile(re.escape("self_replay.") + SHARD_DIR.pattern + re.escape(".jsonl"))  # group 2: count


@dataclass(frozen=True)
class ReplayConfig:
    """One self-replay run; the fields made with ``flag`` are its command line (the placement flags and the shard
    come from the shared placement flags and the launcher)."""

    model_path: Path = flag(help="the base model (HF folder) to sample from")
    output_dir: Path = flag(help=f"written: OUTPUT_DIR/{OUTPUT_FILE}")
    num_texts: int = flag(1024, help="texts to sample")
    max_new_tokens: int = flag(512, help="tokens a text at most")
    batch_size: int = flag(64, help="texts sampled at once")
    start_token: Optional[str] = flag(None, help="token the samples start from (default: BOS, else EOS); e.g. "
                                                 "<|endoftext|> for SmolLM2")
    category: str = flag("self_replay", help="category of the rows (per-category bins)")
    seed: int = flag(42, help="seeds the sampling")
    overwrite: bool = flag(False, help="replace an existing --output_dir (or this shard's file), and start afresh "
                                       "instead of finishing an interrupted run")
    device: str = "auto"  # with several shards on a GPU machine: each shard's own GPUs
    max_gpu_memory: Optional[int] = None  # bytes of weights per GPU (None: placement's default)
    shard: Shard = Shard()

    def validate(self) -> "ReplayConfig":
        for name in ("num_texts", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name} {getattr(self, name)}: must be >= 1")
        if not self.category.strip():
            raise UserInputError("--category: must not be blank")
        return self


@dataclass
class ReplaySummary:
    output: Path
    texts: int  # rows written
    empty: int  # samples that ended at once (no text): skipped, counted
    tokens: int  # generated tokens of the rows written (stop tokens excluded)
    characters: int
    seconds: float  # this run's sampling
    sampled_tokens: int  # this run's share of ``tokens`` (less when it finished an interrupted run)
    resumed_texts: int = 0  # rows an interrupted run had written

    def line(self) -> str:
        mean = self.tokens / self.texts if self.texts else 0.0
        resumed = f" ({self.resumed_texts} written before an interruption)" if self.resumed_texts else ""
        return (f"self-replay: {self.texts} texts{resumed}, {self.tokens:,} tokens ({mean:.0f} a text), "
                f"{self.characters:,} characters; {self.empty} empty samples skipped; {self.seconds:.1f} s "
                f"({self.sampled_tokens / max(self.seconds, 1e-9):,.0f} tokens/s) -> {self.output}")


def start_token_id(tokenizer, start_token: Optional[str]) -> int:
    """The id generation starts from: ``start_token`` (a token of the vocabulary), else BOS, else EOS."""
    if start_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(start_token)
        if token_id is None or token_id == tokenizer.unk_token_id and start_token != tokenizer.unk_token:
            raise UserInputError(f"--start_token {start_token!r}: not a token of this tokenizer")
        return int(token_id)
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise UserInputError("--start_token: the tokenizer has neither a BOS nor an EOS token; name the document start")


def shard_batches(num_texts: int, batch_size: int, shard: Shard) -> List[Tuple[int, int]]:
    """``(k, rows)`` of the batches ``shard`` draws: batch k holds texts ``k * batch_size ..`` (``rows`` of them,
    the last batch possibly fewer) and belongs to shard ``k % shard.count``."""
    batches = -(-num_texts // batch_size)
    return [(k, min(batch_size, num_texts - k * batch_size)) for k in range(shard.index, batches, shard.count)]


def sample_batch(model, tokenizer, cfg: ReplayConfig, start_id: int, k: int, rows: int) -> List[List[int]]:
    """Batch ``k`` of the run: ``rows`` generated id lists (start token excluded, cut at EOS), drawn after seeding
    with ``(seed, k)`` alone, so a batch is the same whichever shard draws it and whether or not the run resumed."""
    from transformers import GenerationConfig

    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    torch.manual_seed(cfg.seed * 1_000_003 + k)  # generate draws from the global RNG (all devices)
    ids = torch.full((rows, 1), start_id, dtype=torch.long, device=model.device)
    # A whole generation config, the model's own not merged in (use_model_defaults=False): a saved
    # generation_config.json with repetition_penalty, no_repeat_ngram_size, min_new_tokens... would otherwise bend
    # the samples away from the model's own distribution, which is what self-replay is for.
    plain = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                             eos_token_id=stop_ids or None, pad_token_id=pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=plain,
                             use_model_defaults=False)
    return [cut_at_stop(row, stop_ids) for row in out[:, 1:].tolist()]


@dataclass
class Written:
    """What the partial file holds: its first ``batches`` batches of this shard, ``size`` bytes, and their counts."""

    batches: int = 0
    size: int = 0
    texts: int = 0
    empty: int = 0
    tokens: int = 0
    characters: int = 0


class ReplayOutput:
    """Where this shard's rows go, and how an interrupted run goes on.

    One shard: ``OUTPUT_DIR/self_replay.jsonl``, written in the hidden sibling folder ``.NAME.replay-partial`` and
    swapped in whole when complete. Several: ``OUTPUT_DIR/self_replay.shard-IIIII-of-NNNNN.jsonl`` (the folder is
    shared), written as ``.NAME.partial`` and renamed when complete (neither is a jsonl name: never read as data).

    Beside the partial file, ``.NAME.progress`` records the run's settings (first line) and, after each batch is on
    disk, the batch count, the file's size and the counts so far. Running the same command again cuts the partial
    file back to the last recorded batch (a batch the crash cut short is dropped) and samples only the batches
    after it: the same texts as an uninterrupted run. Other settings are a one-line error (``--overwrite`` starts
    afresh). A run holds a lock on the progress file: two runs never write one output.
    """

    def __init__(self, cfg: ReplayConfig):
        from colossal_llama.utils.output import clear_output_dir

        self.dir, self.sharded = Path(cfg.output_dir), cfg.shard.count > 1
        self.settings = {"model_path": str(cfg.model_path), "num_texts": cfg.num_texts, "batch_size": cfg.batch_size,
                         "max_new_tokens": cfg.max_new_tokens, "start_token": cfg.start_token,
                         "category": cfg.category, "seed": cfg.seed, "shard": cfg.shard.dir_name}
        if self.sharded:  # prepare reads every jsonl file under the folder: one run's shards only
            self.final = self.dir / SHARD_FILE.format(shard=cfg.shard.dir_name)
            if self.final.exists() and not cfg.overwrite:
                raise UserInputError(f"{self.final}: already exists (pass --overwrite to replace it)")
            check_one_run_per_folder(self.dir, cfg.shard, OUTPUT_FILE, SHARD_FILE_RE, "--output_dir")
            self.work_dir, self.partial = None, self.dir / f".{self.final.name}.partial"
        else:
            self.final = self.dir / OUTPUT_FILE
            if not cfg.overwrite:  # refuse an existing folder now; with --overwrite it is swapped once complete
                clear_output_dir(self.dir, overwrite=False)
            self.work_dir = self.dir.with_name(f".{self.dir.name}.replay-partial")
            self.partial = self.work_dir / OUTPUT_FILE
        self.progress = self.partial.with_name(f".{self.final.name}.progress")
        self._lock = None

    def start(self, overwrite: bool) -> Written:
        """Lock, then start afresh (``overwrite``, or nothing recorded yet) or go on from the last recorded batch."""
        import fcntl

        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.progress, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(f"{self.progress}: another self-replay run is writing this output") from None
        written = None if overwrite else self._recorded()
        if written is None:
            written = Written()
            self._lock.truncate(0)
            self._lock.write(json.dumps({"settings": self.settings}) + "\n")
            self._lock.flush()
        with open(self.partial, "ab") as fh:  # a batch written after its last record is cut off
            fh.truncate(written.size)
        return written

    def _recorded(self) -> Optional[Written]:
        """The last batch the progress file records, checked against the settings; None when there is none."""
        self._lock.seek(0)
        lines = self._lock.read().splitlines()
        if not lines:
            return None
        try:
            saved = json.loads(lines[0])["settings"]
        except (ValueError, KeyError, TypeError):
            return None  # killed while writing the first line: nothing was sampled yet
        changed = sorted(k for k in self.settings if saved.get(k) != self.settings[k])
        if changed:
            raise UserInputError(f"{self.progress}:1: settings: {', '.join(changed)} differ from the interrupted "
                                 "run's (run it with the same settings to finish it, or pass --overwrite to start "
                                 "afresh)")
        written = Written()
        for line in lines[1:]:
            try:
                written = Written(**json.loads(line))
            except (ValueError, TypeError):
                break  # the record the crash cut short (the last line)
        if self.partial.exists() and self.partial.stat().st_size < written.size:
            raise UserInputError(f"{self.partial}: {self.partial.stat().st_size} bytes, but {self.progress} "
                                 f"records {written.size} (the file was changed; pass --overwrite to start afresh)")
        return written

    def record(self, written: Written) -> None:
        """After a batch's rows are on disk (flushed and synced)."""
        self._lock.write(json.dumps(asdict(written)) + "\n")
        self._lock.flush()

    def publish(self) -> Path:
        from colossal_llama.utils.durable import publish_file
        from colossal_llama.utils.output import replace_dir

        self._lock.close()
        self.progress.unlink()
        if self.sharded:
            publish_file(self.partial, self.final)
        else:
            replace_dir(self.work_dir, self.dir)
        return self.final


def write_self_replay(cfg: ReplayConfig) -> ReplaySummary:
    """Sample this shard's texts from the model into ``cfg.output_dir`` (published whole when complete; an
    interrupted run goes on where it stopped, see :class:`ReplayOutput`)."""
    from tqdm.auto import tqdm

    from colossal_llama.inference.loading import load_model_and_tokenizer
    from colossal_llama.inference.placement import placement_for

    cfg = cfg.validate()
    output = ReplayOutput(cfg)
    written = output.start(cfg.overwrite)
    batches = shard_batches(cfg.num_texts, cfg.batch_size, cfg.shard)
    if written.batches:
        log.info("resuming %s: %d of %d batches (%d texts) written by an interrupted run", output.partial,
                 written.batches, len(batches), written.texts)
    local_rank = int(os.environ.get("LOCAL_RANK", cfg.shard.index))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.shard.count))
    placement = placement_for(cfg.device, local_size, local_rank, cfg.max_gpu_memory)
    model, tokenizer = load_model_and_tokenizer(cfg.model_path, device=placement)
    start_id = start_token_id(tokenizer, cfg.start_token)
    start, new_tokens, resumed_texts = time.perf_counter(), 0, written.texts
    todo = batches[written.batches:]
    bar = tqdm(total=sum(rows for _, rows in todo), desc="self-replay", unit="text")
    with open(output.partial, "a", encoding="utf-8") as fh:
        for k, rows in todo:
            for ids in sample_batch(model, tokenizer, cfg, start_id, k, rows):
                text = decode_reply(tokenizer, ids)
                if not text.strip():
                    written.empty += 1
                    continue
                fh.write(json.dumps({"source": "", "target": text, "category": cfg.category}, ensure_ascii=False)
                         + "\n")
                written.texts, written.tokens = written.texts + 1, written.tokens + len(ids)
                written.characters += len(text)
                new_tokens += len(ids)
            fh.flush()
            os.fsync(fh.fileno())
            written.batches, written.size = written.batches + 1, fh.tell()
            output.record(written)
            bar.update(rows)
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
    bar.close()
    summary = ReplaySummary(output.publish(), written.texts, written.empty, written.tokens, written.characters,
                            time.perf_counter() - start, new_tokens, resumed_texts)
    log.info(summary.line())
    return summary


def build_parser() -> argparse.ArgumentParser:
    from colossal_llama.inference.cli import add_placement_args

    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_flags(p, ReplayConfig)
    add_placement_args(p)
    p.add_argument("--num_shards", type=int, default=None,
                   help="split the batches over N runs (default: WORLD_SIZE, else 1)")
    p.add_argument("--shard_index", type=int, default=None, help="which shard this run draws (default: RANK)")
    return p


@cli_entry
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    shard = Shard.from_launcher(args.num_shards, args.shard_index)
    config = config_from(args, ReplayConfig, device=args.device, max_gpu_memory=args.max_gpu_memory, shard=shard)
    summary = write_self_replay(config)
    print(summary.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
hold exactly the texts of a 1-shard run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

from colossal_llama.dataset.config import SHARD_DIR, Shard, check_one_run_per_folder
from colossal_llama.inference.generation import cut_at_stop
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
    overwrite: bool = flag(False, help="replace an existing --output_dir (or this shard's file)")
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
    seconds: float

    def line(self) -> str:
        mean = self.tokens / self.texts if self.texts else 0.0
        return (f"self-replay: {self.texts} texts, {self.tokens:,} tokens ({mean:.0f} a text), {self.characters:,} "
                f"characters; {self.empty} empty samples skipped; {self.seconds:.1f} s "
                f"({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s) -> {self.output}")


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


def sample_batches(model, tokenizer, cfg: ReplayConfig, start_id: int) -> Iterator[List[List[int]]]:
    """This shard's batches of generated ids (start token excluded, cut at EOS); over all shards
    ``cfg.num_texts`` samples."""
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    for k, rows in shard_batches(cfg.num_texts, cfg.batch_size, cfg.shard):
        torch.manual_seed(cfg.seed * 1_000_003 + k)  # generate draws from the global RNG (all devices)
        ids = torch.full((rows, 1), start_id, dtype=torch.long, device=model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                                 eos_token_id=stop_ids or None, pad_token_id=pad_id)
        yield [cut_at_stop(row, stop_ids) for row in out[:, 1:].tolist()]


class ReplayOutput:
    """Where this shard's rows go. One shard: ``OUTPUT_DIR/self_replay.jsonl``, in a temporary sibling folder
    swapped in whole when complete. Several: ``OUTPUT_DIR/self_replay.shard-IIIII-of-NNNNN.jsonl`` (the folder is
    shared), written as ``.NAME.partial`` (not a jsonl name: never read as data) and renamed when complete."""

    def __init__(self, cfg: ReplayConfig):
        from colossal_llama.utils.output import clear_output_dir, remove_stale_siblings, tmp_sibling

        self.dir, self.sharded = Path(cfg.output_dir), cfg.shard.count > 1
        if self.sharded:  # prepare reads every jsonl file under the folder: one run's shards only
            self.final = self.dir / SHARD_FILE.format(shard=cfg.shard.dir_name)
            if self.final.exists() and not cfg.overwrite:
                raise UserInputError(f"{self.final}: already exists (pass --overwrite to replace it)")
            check_one_run_per_folder(self.dir, cfg.shard, OUTPUT_FILE, SHARD_FILE_RE, "--output_dir")
            self.tmp_dir, self.partial = None, self.dir / f".{self.final.name}.partial"
        else:
            self.final = self.dir / OUTPUT_FILE
            if not cfg.overwrite:  # refuse an existing folder now; with --overwrite it is swapped once complete
                clear_output_dir(self.dir, overwrite=False)
            remove_stale_siblings(self.dir, "tmp-replay")
            self.tmp_dir = tmp_sibling(self.dir, "tmp-replay")
            self.partial = self.tmp_dir / OUTPUT_FILE

    def open(self):
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        return open(self.partial, "w", encoding="utf-8")

    def publish(self) -> Path:
        from colossal_llama.utils.output import replace_dir

        if self.sharded:
            os.replace(self.partial, self.final)
        else:
            replace_dir(self.tmp_dir, self.dir)
        return self.final


def write_self_replay(cfg: ReplayConfig) -> ReplaySummary:
    """Sample this shard's texts from the model into ``cfg.output_dir`` (written whole or not at all)."""
    from tqdm.auto import tqdm

    from colossal_llama.inference.loading import load_model_and_tokenizer
    from colossal_llama.inference.placement import placement_for

    cfg = cfg.validate()
    output = ReplayOutput(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", cfg.shard.index))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.shard.count))
    placement = placement_for(cfg.device, local_size, local_rank, cfg.max_gpu_memory)
    model, tokenizer = load_model_and_tokenizer(cfg.model_path, device=placement)
    start_id = start_token_id(tokenizer, cfg.start_token)
    texts = empty = tokens = characters = 0
    start = time.perf_counter()
    batches = shard_batches(cfg.num_texts, cfg.batch_size, cfg.shard)
    bar = tqdm(total=sum(rows for _, rows in batches), desc="self-replay", unit="text")
    with output.open() as fh:
        for batch in sample_batches(model, tokenizer, cfg, start_id):
            for ids in batch:
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if not text.strip():
                    empty += 1
                    continue
                fh.write(json.dumps({"source": "", "target": text, "category": cfg.category}, ensure_ascii=False)
                         + "\n")
                texts, tokens, characters = texts + 1, tokens + len(ids), characters + len(text)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
    bar.close()
    summary = ReplaySummary(output.publish(), texts, empty, tokens, characters, time.perf_counter() - start)
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

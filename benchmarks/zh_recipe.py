"""The Colossal-LLaMA recipe on a real model: teach SmolLM2-135M Chinese, keep its English. Prints a before/after table.

Stages (each timed; a finished stage is reused when the same ``--workdir`` is run again with the same settings,
so ``--stop_after prepare`` can do the CPU stages early and a second call the GPU ones):

1. base       SmolLM2-135M-Instruct from its GGUF (``--base_model`` skips the export)
2. split      People's Daily: the last ``--heldout`` paragraphs are held out, never trained on or mined
3. mine       new pieces mined with SentencePiece from the Chinese corpora (training paragraphs + reviews)
4. expand     the tokenizer expanded with them (``expand_tokenizer``)
5. init       new embedding rows = mean of their old sub-pieces (``init_model``)
6. prepare    the training paragraphs tokenised and packed (``prepare_pretrain``)
7. replay     English to replay, sampled from the base model itself (``colossal_llama.inference.self_replay``:
              no English corpus is trained on, Botchan stays unseen), tokenised and packed the same way
8. train      ``train.py``: continual pre-training for a fixed ``--steps`` (zero2, bf16 on CUDA; ddp, fp32 on CPU)
              on the mixture ``news:1-s replay:s`` (``--replay_share s``; 0: People's Daily alone)
9. evaluate   bits/char on the held-out paragraphs and on English (Botchan), Chinese/English characters per
              token, for the base model, the mean-initialised one and the trained one

Target (the issue): Chinese bits/char down at least 30 %, English bits/char up at most 3 %.

    python benchmarks/zh_recipe.py --report gpu_report.md          # CUDA: the measured recipe
    python benchmarks/zh_recipe.py --dry_run                       # CPU: every stage on small amounts
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from colossal_llama.utils.errors import UserInputError, cli_entry  # noqa: E402

NEWS = "zh_news_peoples_daily_199801.jsonl"
REVIEWS = "zh_reviews.jsonl"
ENGLISH = "en_novel_botchan.jsonl"
STAGES = ("base", "split", "mine", "expand", "init", "prepare", "replay", "train", "evaluate")
ZH_TARGET, EN_LIMIT = -0.30, 0.03  # relative change of bits/char: Chinese at most -30 %, English at most +3 %


@dataclass(frozen=True)
class RecipeConfig:
    steps: int = 400
    lr: float = 1e-4
    micro_batch_size: int = 8
    max_length: int = 2048
    plugin: str = "zero2"  # CPU: ddp (zero2 needs colossalai's CPU patches there)
    heldout: int = 400  # last People's Daily paragraphs, never trained on
    train_paragraphs: Optional[int] = None  # None: all the others
    eval_zh: Optional[int] = None  # held-out paragraphs scored (None: all)
    eval_en: Optional[int] = None  # Botchan passages scored (None: all 292)
    mine_vocab: int = 12000  # SentencePiece vocabulary trained on the Chinese corpora (> its distinct characters)
    mine_coverage: float = 0.995  # characters the SentencePiece model must cover (rarer ones are not pieces)
    mine_sentences: int = 200_000
    new_pieces: int = 4000  # at most this many pieces added
    replay_share: float = 0.2  # of every step's sequences: the base model's own samples (0: none)
    replay_texts: int = 512  # samples drawn from the base model (at once: one generate call)
    replay_new_tokens: int = 512  # tokens a sample at most
    eval_batch: int = 32
    curve_points: int = 4  # checkpoints scored along the way (every steps/curve_points), the last one included
    seed: int = 42


DRY_RUN = dict(steps=2, micro_batch_size=1, max_length=128, heldout=200, train_paragraphs=600, eval_zh=6, eval_en=1,
               mine_vocab=4000, mine_sentences=3000, new_pieces=300, eval_batch=8, curve_points=1, replay_share=0.5,
               replay_texts=4, replay_new_tokens=32)
REPLAY_START = "<|endoftext|>"  # SmolLM2's document separator: samples start where its pre-training documents did


class Workdir:
    """Stage outputs under one folder, with ``stages.json`` recording each finished stage's seconds and
    ``config.json`` the settings they were made with (a second run with other settings is refused)."""

    def __init__(self, root: Path, cfg: RecipeConfig, base_model: Optional[Path], data: Path,
                 report: Optional[Path] = None):
        self.root, self.report = root, report
        root.mkdir(parents=True, exist_ok=True)
        settings = {**dataclasses.asdict(cfg), "base_model": str(base_model), "data": str(data)}
        config = root / "config.json"
        if config.is_file() and json.loads(config.read_text()) != settings:
            raise UserInputError(f"--workdir {root} holds a recipe run with other settings: use another "
                                 "--workdir or --overwrite")
        config.write_text(json.dumps(settings, indent=1))
        self.stages_file = root / "stages.json"
        self.done: Dict[str, float] = json.loads(self.stages_file.read_text()) if self.stages_file.is_file() else {}

    def note(self, line: str) -> None:
        """A progress line for the console and the report (which grows as the recipe goes)."""
        print(f"[recipe] {line}", flush=True)
        if self.report is not None:
            with open(self.report, "a", encoding="utf-8") as fh:
                fh.write(f"- {line}\n")

    def run(self, name: str, fn: Callable[[], Optional[str]]) -> float:
        if name in self.done:
            self.note(f"{name}: {self.done[name]:.1f} s (done earlier in {self.root})")
            return self.done[name]
        print(f"[recipe] {name} ...", flush=True)
        start = time.perf_counter()
        outcome = fn()
        self.done[name] = time.perf_counter() - start
        self.stages_file.write_text(json.dumps(self.done, indent=1))
        self.note(f"{name}: {self.done[name]:.1f} s" + (f": {outcome}" if outcome else ""))
        return self.done[name]


# ---------------------------------------------------------------------------------------------- stages
def split_news(data: Path, out: Path, cfg: RecipeConfig) -> str:
    """``train/news.jsonl`` (paragraphs before the held-out tail, at most ``train_paragraphs``) and ``heldout.jsonl``."""
    lines = [ln for ln in (data / "pretrain" / NEWS).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) <= cfg.heldout:
        raise UserInputError(f"{data / 'pretrain' / NEWS}: {len(lines)} paragraphs, not more than --heldout {cfg.heldout}")
    train, heldout = lines[:-cfg.heldout], lines[-cfg.heldout:]
    if cfg.train_paragraphs is not None:
        train = train[:cfg.train_paragraphs]
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "train" / "news.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (out / "heldout.jsonl").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    return f"People's Daily: {len(train)} paragraphs to train on, the last {len(heldout)} held out"


def mine(data: Path, work: Path, base: Path, cfg: RecipeConfig) -> str:
    from colossal_llama.tokenizer.mine_pieces import MineConfig, mine_pieces

    pieces, report = mine_pieces(MineConfig(  # overwrite: a stage redone (after a kill) replaces its own output
        output=work / "pieces.jsonl", corpus=[work / "train" / "news.jsonl", data / "pretrain" / REVIEWS],
        base_tokenizer_dir=base, vocab_size=cfg.mine_vocab, max_sentences=cfg.mine_sentences,
        top_k=cfg.new_pieces, character_coverage=cfg.mine_coverage, overwrite=True))
    print(report.format(), flush=True)
    return f"{len(pieces)} new pieces from {report.sentences} lines of Chinese (SentencePiece, vocab {cfg.mine_vocab})"


def expand(data: Path, work: Path, base: Path) -> str:
    from colossal_llama.tokenizer.init_tokenizer import expand_tokenizer
    from colossal_llama.tokenizer.pieces import read_pieces_file

    pieces = read_pieces_file(work / "pieces.jsonl")
    report = expand_tokenizer(base, work / "tokenizer", pieces.pieces, overwrite=True,
                              report_files=[work / "heldout.jsonl", data / "pretrain" / ENGLISH])
    print(report.format(), flush=True)
    return f"vocabulary {report.vocab_before} -> {report.vocab_after}; {report.check}: {report.check_identical}/" \
           f"{report.check_total} lines identical"


def init(work: Path, base: Path) -> str:
    from colossal_llama.model.init_model import init_model_from_expanded_tokenizer

    report = init_model_from_expanded_tokenizer(base, work / "tokenizer", work / "init", overwrite=True)
    return (f"{report.new_rows} new rows = mean of their old pieces ({report.pieces_per_new_row['mean']:.1f} on "
            f"average), {report.tensors_copied} tensors copied bit for bit")


def prepare(work: Path, cfg: RecipeConfig, inputs: str = "train", output: str = "data") -> str:
    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.prepare import prepare_pretrain

    summary = prepare_pretrain(PretrainPrepConfig(
        input_dirs=[work / inputs], tokenizer_dir=work / "init", output=OutputLayout.under(work / output),
        max_length=cfg.max_length, num_bins=1, num_proc=min(8, os.cpu_count() or 1), seed=cfg.seed, overwrite=True))
    print("\n".join(summary.lines()), flush=True)
    return f"{summary.counts.tokens_out:,} tokens in {summary.counts.sequences} rows of <= {cfg.max_length}"


def replay(work: Path, base: Path, cfg: RecipeConfig, device: str) -> str:
    """The base model's own samples (``replay_in/``), packed like the news (``replay_data/``)."""
    from colossal_llama.inference.self_replay import ReplayConfig, write_self_replay

    if cfg.replay_share == 0:
        return "none (--replay_share 0)"
    sampled = write_self_replay(ReplayConfig(
        base, work / "replay_in", num_texts=cfg.replay_texts, max_new_tokens=cfg.replay_new_tokens,
        batch_size=cfg.replay_texts, start_token=REPLAY_START, seed=cfg.seed, device=device, overwrite=True))
    return f"{sampled.line()}; packed: {prepare(work, cfg, 'replay_in', 'replay_data')}"


def train(work: Path, cfg: RecipeConfig, cuda: bool) -> str:
    """train.py as a single rank (its own process: Liger patches and CUDA state stay out of this one)."""
    save = work / "train_run"
    shutil.rmtree(save, ignore_errors=True)
    datasets = [str(work / "data" / "arrow")]
    if cfg.replay_share > 0:
        datasets = [f"{datasets[0]}:{1 - cfg.replay_share:g}", f"{work / 'replay_data' / 'arrow'}:{cfg.replay_share:g}"]
    args = [sys.executable, str(REPO / "train.py"), "--pretrained", str(work / "init"), "--dataset", *datasets,
            "--plugin", cfg.plugin if cuda else "ddp", "--mixed_precision", "bf16" if cuda else "fp32",
            "--max_steps", str(cfg.steps), "--num_epochs", "1000", "--micro_batch_size", str(cfg.micro_batch_size),
            "--max_length", str(cfg.max_length), "--padding_mode", "max_length", "--lr", str(cfg.lr),
            "--save_interval", str(max(1, cfg.steps // cfg.curve_points)), "--log_interval", str(max(1, cfg.steps // 10)), "--seed", str(cfg.seed),
            "--save_dir", str(save), "--tensorboard_dir", str(save / "tb")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(args, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: train.py exited with {proc.returncode} (its output is above)")
    from colossal_llama.training.metrics import read_loss_log

    losses = [r["loss"] for r in read_loss_log(save / "losses.jsonl") if r["loss"] is not None]  # null: skipped
    tokens = sum(r["tokens"] for r in read_loss_log(save / "losses.jsonl"))
    config = json.loads((save / "train_config.json").read_text())
    return (f"{len(losses)} step(s) on {tokens:,} tokens ({config['plugin']}, {config['mixed_precision']}, attention "
            f"{config['plan']['attn_implementation']}, Liger {'on' if config['plan']['liger'] else 'off'}): "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


@dataclass
class Scores:
    model: str
    zh_bpc: float
    en_bpc: float
    zh_chars_per_token: float
    en_chars_per_token: float


def evaluate(work: Path, data: Path, base: Path, cfg: RecipeConfig, device: str) -> List[Scores]:
    import torch

    from colossal_llama.eval.bits_per_char import BpcConfig, bits_per_char, load_texts
    from colossal_llama.inference.loading import load_model_and_tokenizer

    zh, _ = load_texts(work / "heldout.jsonl", "target", cfg.eval_zh)
    en, _ = load_texts(data / "pretrain" / ENGLISH, "target", cfg.eval_en)
    bpc_cfg = BpcConfig(window=1024, stride=512, batch_size=cfg.eval_batch)
    from colossal_llama.training.checkpoint import complete_checkpoints

    models = [("base", base), ("expanded, mean-init", work / "init")]
    for checkpoint in complete_checkpoints(work / "train_run"):
        models.append((f"trained, step {checkpoint.name.split('step-')[-1]}", checkpoint / "modeling"))
    rows = []
    for name, path in models:
        model, tokenizer = load_model_and_tokenizer(path, device=device)
        model = model.float()  # every model scored in float32 (training saves bf16 on CUDA)
        zh_r, en_r = (bits_per_char(model, tokenizer, texts, bpc_cfg) for texts in (zh, en))
        rows.append(Scores(name, zh_r.bpc, en_r.bpc, zh_r.characters / zh_r.tokens, en_r.characters / en_r.tokens))
        print(f"[recipe] {name}: zh {zh_r.bpc:.4f} bits/char ({zh_r.characters} chars), en {en_r.bpc:.4f} bits/char "
              f"({en_r.characters} chars)", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- report
def change(after: float, before: float) -> float:
    return after / before - 1.0


def format_report(cfg: RecipeConfig, rows: List[Scores], seconds: Dict[str, float], device: str) -> List[str]:
    base, trained = rows[0], rows[-1]
    zh, en = change(trained.zh_bpc, base.zh_bpc), change(trained.en_bpc, base.en_bpc)
    replayed = (f"{100 * cfg.replay_share:g} % of the sequences the base model's own samples"
                if cfg.replay_share else "no replay")
    lines = ["", f"SmolLM2-135M-Instruct, {cfg.steps} step(s) of {cfg.micro_batch_size} x {cfg.max_length} tokens, "
             f"lr {cfg.lr:g}, {replayed}, {device}; held out: last {cfg.heldout} People's Daily paragraphs "
             f"({cfg.eval_zh or cfg.heldout} scored), Botchan ({cfg.eval_en or 'all'} passages)", "",
             "| model | zh bits/char | en bits/char | zh chars/token | en chars/token |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.zh_bpc:.4f} | {r.en_bpc:.4f} | {r.zh_chars_per_token:.3f} | "
                     f"{r.en_chars_per_token:.3f} |")
    lines += ["", f"- Chinese bits/char {100 * zh:+.1f} % (target <= {100 * ZH_TARGET:.0f} %): "
                  f"{'met' if zh <= ZH_TARGET else 'NOT met'}",
              f"- English bits/char {100 * en:+.1f} % (limit +{100 * EN_LIMIT:.0f} %): "
              f"{'met' if en <= EN_LIMIT else 'NOT met'}",
              f"- Chinese characters per token {base.zh_chars_per_token:.3f} -> {trained.zh_chars_per_token:.3f}",
              "- stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    return lines


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    defaults = RecipeConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(RecipeConfig):
        kind = type(getattr(defaults, f.name)) if getattr(defaults, f.name) is not None else int
        p.add_argument(f"--{f.name}", type=kind, default=None, help=f"default {getattr(defaults, f.name)}")
    p.add_argument("--dry_run", action="store_true", help="CPU check of every stage: " + ", ".join(
        f"{k}={v}" for k, v in DRY_RUN.items()))
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "zh_recipe")
    p.add_argument("--overwrite", action="store_true", help="start the workdir afresh")
    p.add_argument("--base_model", type=Path, default=None, help="HF folder of SmolLM2 (default: export the GGUF)")
    p.add_argument("--stop_after", choices=STAGES, default=None, help="stop after this stage")
    p.add_argument("--report", type=Path, default=None, help="append the markdown table here")
    a = p.parse_args(argv)
    chosen = {f.name: getattr(a, f.name) for f in dataclasses.fields(RecipeConfig) if getattr(a, f.name) is not None}
    cfg = RecipeConfig(**{**(DRY_RUN if a.dry_run else {}), **chosen})
    if cfg.steps < 1 or cfg.heldout < 1 or cfg.micro_batch_size < 1:
        raise UserInputError("--steps, --heldout and --micro_batch_size must be >= 1")
    if not 0 <= cfg.replay_share < 1:
        raise UserInputError(f"--replay_share {cfg.replay_share}: must be in [0, 1)")
    return a, cfg


@cli_entry
def main(argv=None) -> int:
    import torch

    from colossal_llama.utils.paths import data_root, smollm2_gguf

    args, cfg = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    data = data_root()
    if args.overwrite:
        shutil.rmtree(args.workdir, ignore_errors=True)
    work = Workdir(args.workdir, cfg, args.base_model, data, args.report)
    base = args.base_model or args.workdir / "base"
    if args.base_model is None and not smollm2_gguf().is_file():
        raise UserInputError(f"{smollm2_gguf()}: the SmolLM2 GGUF is missing (pass --base_model DIR)")

    def export_base() -> str:
        from colossal_llama.model.gguf_export import export_gguf_to_hf

        if args.base_model is not None:
            return f"given: {args.base_model}"
        export_gguf_to_hf(smollm2_gguf(), base)
        return f"exported from {smollm2_gguf().name}"

    stages = {
        "base": export_base,
        "split": lambda: split_news(data, args.workdir, cfg),
        "mine": lambda: mine(data, args.workdir, base, cfg),
        "expand": lambda: expand(data, args.workdir, base),
        "init": lambda: init(args.workdir, base),
        "prepare": lambda: prepare(args.workdir, cfg),
        "replay": lambda: replay(args.workdir, base, cfg, device),
        "train": lambda: train(args.workdir, cfg, cuda),
    }
    for name, fn in stages.items():
        work.run(name, fn)
        if args.stop_after == name:
            return 0
    start = time.perf_counter()
    rows = evaluate(args.workdir, data, base, cfg, device)
    seconds = {**work.done, "evaluate": time.perf_counter() - start}
    name = torch.cuda.get_device_name() if cuda else "CPU"
    lines = format_report(cfg, rows, seconds, name)
    print("\n".join(lines), flush=True)
    if args.report is not None:
        with open(args.report, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

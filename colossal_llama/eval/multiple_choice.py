"""Multiple-choice evaluation (MMLU style) by comparing the next-token logits of the answer letters.

Prompt (ColossalEval / original MMLU format), k examples from the same subject, the question itself excluded::

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. {answer_a}
    ...
    D. {answer_d}
    Answer: B

    ... (k solved examples, then the question to score, ending with "Answer:")

``method="letter"`` (default, ColossalEval / MMLU): the model's choice is the letter whose token has the highest
logit right after "Answer:". Which token that is depends on the tokenizer (" A" as one byte-level token, or "▁A"
in SentencePiece): we take the token that the tokenizer itself produces for "Answer: A", so the comparison is
between exactly the tokens the examples show.

``method="cloze"`` (lm-eval's ``acc_norm``): no letters are shown; each question is ``Question: {q}\nAnswer:``
and the choice is the answer text with the highest log-likelihood per character as its continuation. Small
models (~100M parameters) sit at chance with letters but not with cloze scoring.
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from colossal_llama.eval.batching import right_pad, target_logprobs
from colossal_llama.utils.cli import flag
from colossal_llama.utils.errors import DataError, UserInputError
from colossal_llama.utils.jsonl import iter_jsonl
from colossal_llama.utils.ranks import Ranks

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
CHOICE_FIELDS = ("answer_a", "answer_b", "answer_c", "answer_d")
ANSWER_CUE = "Answer:"
METHODS = ("letter", "cloze")


@dataclass(frozen=True)
class MCItem:
    """One question. ``answer`` is the index (0-3) of the correct choice; ``where`` is ``file:line``."""

    question: str
    choices: tuple
    answer: int
    subject: str
    where: str


def subject_list(value: str) -> Optional[List[str]]:
    """``--subjects a,b c,d_e`` -> ``["a", "b c", "d_e"]`` (None when empty: every subject)."""
    return [s.strip() for s in value.split(",") if s.strip()] or None


@dataclass
class MCConfig:
    """``evaluate.py mc``'s scoring flags (this class *is* that part of its command line)."""

    k_shot: int = flag(5, help="solved examples of the same subject before each question")
    batch_size: int = flag(8, help="prompts scored at once")
    seed: int = flag(42, help="picks the examples")
    max_per_subject: Optional[int] = flag(None, help="first N questions of each subject, in file order")
    subjects: Optional[List[str]] = flag(None, parse=subject_list,
                                         help="comma-separated subjects (spaces or underscores); default all")
    max_length: Optional[int] = flag(None, help="prompt token budget (default: the model's context)")
    method: str = flag("letter", choices=("letter", "cloze"),
                       help="letter = answer-letter logits (MMLU); cloze = answer-text likelihood per character")


@dataclass
class MCResult:
    """Counts per subject; ``predictions`` holds one ``{where, subject, predicted, correct}`` per item."""

    per_subject: Dict[str, Dict[str, int]] = field(default_factory=dict)
    predictions: List[dict] = field(default_factory=list)
    shots_reduced: int = 0  # prompts that had to drop examples to fit max_length
    shots_short: int = 0  # prompts with fewer than k examples: their subject has k or fewer questions
    batches_per_process: List[int] = field(default_factory=list)  # in rank order (one process: [all of them])

    @property
    def correct(self) -> int:
        return sum(s["correct"] for s in self.per_subject.values())

    @property
    def total(self) -> int:
        return sum(s["total"] for s in self.per_subject.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def to_dict(self) -> dict:
        subjects = {s: {**c, "accuracy": c["correct"] / c["total"]} for s, c in sorted(self.per_subject.items())}
        return {"overall": {"correct": self.correct, "total": self.total, "accuracy": self.accuracy},
                "subjects": subjects, "shots_reduced": self.shots_reduced,
                "shots_short": self.shots_short,
                "batches_per_process": self.batches_per_process, "predictions": self.predictions}


def normalize_subject(name: str) -> str:
    """``high_school_geography`` and ``High School Geography`` both mean ``high school geography``."""
    return " ".join(name.replace("_", " ").lower().split())


def _text_field(row: dict, name: str, path, line: int) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, line, name, "missing or not a non-empty string")
    return value.strip()


def load_mc_items(path) -> List[MCItem]:
    """Read and validate a jsonl of ``question, answer_a..answer_d, correct_answer (A-D), topic`` rows."""
    items = []
    for line, row in iter_jsonl(Path(path)):
        if not isinstance(row, dict):
            raise DataError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
        choices = tuple(_text_field(row, f, path, line) for f in CHOICE_FIELDS)
        letter = row.get("correct_answer")
        if not isinstance(letter, str) or letter.strip().upper() not in LETTERS:
            raise DataError(path, line, "correct_answer", f"expected one of A, B, C, D, got {letter!r}")
        items.append(MCItem(_text_field(row, "question", path, line), choices, LETTERS.index(letter.strip().upper()),
                            normalize_subject(_text_field(row, "topic", path, line)), f"{path}:{line}"))
    if not items:
        raise UserInputError(f"{path}: no questions")
    return items


def select_items(items: Sequence[MCItem], config: MCConfig) -> List[MCItem]:
    """The items to score: the requested subjects (all by default), at most ``max_per_subject`` each."""
    known = sorted({it.subject for it in items})
    wanted = None
    if config.subjects:
        wanted = {normalize_subject(s) for s in config.subjects}
        unknown = sorted(wanted - set(known))
        if unknown:
            raise UserInputError(f"--subjects: unknown subject(s) {', '.join(unknown)}; known: {', '.join(known)}")
    taken: Dict[str, int] = defaultdict(int)
    chosen = []
    for it in items:
        if wanted is not None and it.subject not in wanted:
            continue
        if config.max_per_subject is not None and taken[it.subject] >= config.max_per_subject:
            continue
        taken[it.subject] += 1
        chosen.append(it)
    return chosen


def format_question(item: MCItem, with_answer: bool, method: str = "letter") -> str:
    """One question block; with ``with_answer`` it ends with its solution, else with ``Answer:``."""
    if method == "cloze":
        lines = [f"Question: {item.question}"]
        solution = item.choices[item.answer]
    else:
        lines = [item.question, *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices))]
        solution = LETTERS[item.answer]
    lines.append(f"{ANSWER_CUE} {solution}" if with_answer else ANSWER_CUE)
    return "\n".join(lines)


def build_prompt(item: MCItem, shots: Sequence[MCItem], method: str = "letter") -> str:
    """The k-shot prompt for ``item``; it ends with ``Answer:`` (no trailing space).

    Cloze prompts have no "multiple choice" header (no choices are shown): measured on SmolLM2-135M marketing,
    the header costs accuracy (39/100 with it, 44/100 without) and ~20 tokens per scored row.
    """
    header = [] if method == "cloze" else [
        f"The following are multiple choice questions (with answers) about {item.subject}."]
    blocks = [*header, *(format_question(s, True, method) for s in shots), format_question(item, False, method)]
    return "\n\n".join(blocks)


def choose_shots(item: MCItem, pool: Sequence[MCItem], k: int, seed: int) -> List[MCItem]:
    """``k`` examples of the same subject, never ``item`` itself; the same (seed, item) gives the same shots."""
    candidates = [p for p in pool if p.subject == item.subject and p.where != item.where]
    rng = random.Random(f"{seed}:{item.where}")
    return rng.sample(candidates, min(k, len(candidates)))


def answer_token_ids(tokenizer, prompt: str) -> List[int]:
    """Ids of the tokens that follow ``prompt`` (ending in "Answer:") when the tokenizer writes " A".." D".

    Raises :class:`UserInputError` when the letters do not start with four distinct tokens after the prompt.
    """
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS:
        full = tokenizer(f"{prompt} {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise UserInputError(f"tokenizer merges the answer letter {letter!r} into '{ANSWER_CUE}'; cannot score by letter logits")
        ids.append(full[len(base)])
    if len(set(ids)) != len(LETTERS):
        raise UserInputError(f"answer letters A-D share tokens {ids} with this tokenizer")
    return ids


def _fit_prompt(tokenizer, item: MCItem, shots: List[MCItem], budget: int, method: str) -> tuple:
    """Prompt ids for ``item``, dropping the last examples until it fits ``budget`` tokens together with what is
    scored after it (cloze: the longest answer; letter: nothing, the logits at its last position are read).
    Returns (ids, n_dropped)."""
    room = max(len(_answer_ids(tokenizer, c)) for c in item.choices) if method == "cloze" else 0
    for n in range(len(shots), -1, -1):
        ids = tokenizer(build_prompt(item, shots[:n], method))["input_ids"]
        if len(ids) + room <= budget:
            return ids, len(shots) - n
    answer = f" and {room} for its longest answer" if room else ""
    raise DataError(item.where.rsplit(":", 1)[0], int(item.where.rsplit(":", 1)[1]), "question",
                    f"the question alone needs {len(ids)} tokens{answer}, more than --max_length {budget}")


def _answer_ids(tokenizer, choice: str) -> List[int]:
    """The tokens cloze scores after the prompt for ``choice``."""
    return tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def last_token_logits(model, batch: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits at the last real position of each prompt, shape (batch, vocab). Right padding keeps positions 0.."""
    input_ids = right_pad(batch, pad_id)  # no attention mask: see eval/batching.py
    lengths = torch.tensor([len(ids) for ids in batch])
    # Run the decoder, then the LM head on one position per row: full (batch, seq, vocab) logits would cost GBs.
    hidden = model.get_decoder()(input_ids=input_ids.to(model.device))[0]
    last = hidden[torch.arange(len(batch), device=hidden.device), (lengths - 1).to(hidden.device)]
    return model.get_output_embeddings()(last).float()


def continuation_logprobs(model, rows: Sequence[tuple], pad_id: int) -> List[float]:
    """Sum of log p(continuation | context) per row; ``rows`` are ``(context_ids, continuation_ids)`` pairs."""
    input_ids = right_pad([list(ctx) + list(cont) for ctx, cont in rows], pad_id)  # no mask: see eval/batching.py
    row_idx = torch.tensor([r for r, (ctx, cont) in enumerate(rows) for _ in cont])
    positions = torch.tensor([len(ctx) - 1 + j for ctx, cont in rows for j in range(len(cont))])
    targets = torch.tensor([t for _, cont in rows for t in cont])
    token_lp = target_logprobs(model, input_ids, row_idx, positions, targets)
    return torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_idx, token_lp.double().cpu()).tolist()


def _predict_letter(model, tokenizer, items, prompts, pad_id: int, idx: List[int]) -> List[int]:
    letter_ids = answer_token_ids(tokenizer, build_prompt(items[0], []))
    return last_token_logits(model, [prompts[i] for i in idx], pad_id)[:, letter_ids].argmax(dim=-1).tolist()


def _predict_cloze(model, tokenizer, items, prompts, pad_id: int, idx: List[int]) -> List[int]:
    rows, chars = [], []
    for i in idx:
        for choice in items[i].choices:
            rows.append((prompts[i], _answer_ids(tokenizer, choice)))
            chars.append(len(choice))
    scores = [lp / n for lp, n in zip(continuation_logprobs(model, rows, pad_id), chars)]
    return [max(range(len(LETTERS)), key=lambda c: scores[4 * k + c]) for k in range(len(idx))]


def evaluate_multiple_choice(model, tokenizer, pool: Sequence[MCItem], config: MCConfig,
                             ranks: Ranks = Ranks()) -> MCResult:
    """Score the selected items of ``pool`` (examples are drawn from ``pool`` too). Longest prompts first; with
    several processes (``ranks``) each scores its share of the batches and every process returns the whole
    result (each builds every prompt: the batches must be the same everywhere)."""
    if config.method not in METHODS:
        raise UserInputError(f"--method: expected one of {', '.join(METHODS)}, got {config.method!r}")
    items = select_items(pool, config)
    if not items:
        raise UserInputError("no questions selected (check --subjects / --max_per_subject)")
    budget = config.max_length or int(getattr(model.config, "max_position_embeddings", 2048))
    result = MCResult()
    prompts = []
    for it in items:
        shots = choose_shots(it, pool, config.k_shot, config.seed)
        result.shots_short += len(shots) < config.k_shot
        ids, dropped = _fit_prompt(tokenizer, it, shots, budget, config.method)
        result.shots_reduced += dropped > 0
        prompts.append(ids)
    predict = _predict_cloze if config.method == "cloze" else _predict_letter
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    batches = ranks.share_batches(order, config.batch_size)
    mine = {}
    with tqdm(total=sum(map(len, batches)), desc=f"multiple choice ({config.method})", unit="q",
              disable=not ranks.is_main) as bar:
        for idx in batches:
            mine.update(zip(idx, predict(model, tokenizer, items, prompts, pad_id, idx)))
            bar.update(len(idx))
    predicted = ranks.merge(mine)
    result.batches_per_process = ranks.per_process(len(batches))
    for i, it in enumerate(items):
        choice = predicted[i]
        counts = result.per_subject.setdefault(it.subject, {"correct": 0, "total": 0})
        counts["correct"] += choice == it.answer
        counts["total"] += 1
        result.predictions.append({"where": it.where, "subject": it.subject, "predicted": LETTERS[choice],
                                   "answer": LETTERS[it.answer], "correct": choice == it.answer})
    if result.shots_reduced:
        log.warning("%d of %d prompts dropped examples to fit %d tokens", result.shots_reduced, len(items), budget)
    if result.shots_short:
        log.warning("%d of %d prompts have fewer than %d examples: their subject has too few other questions in "
                    "the data", result.shots_short, len(items), config.k_shot)
    return result

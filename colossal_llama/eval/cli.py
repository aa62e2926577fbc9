"""``evaluate.py`` / ``colossal-llama-evaluate``: ``mc`` (multiple-choice accuracy) and ``bpc`` (bits per character).

Each subcommand prints a table, a one-line summary (``mc: ...`` / ``bpc: ...``) and, with ``--output``, a JSON report.
Under ``torchrun --nproc_per_node N`` / ``colossalai run`` the batches are dealt out over the N processes (each on
its own GPUs with ``--device auto`` or ``cuda``: a block of the machine's GPUs each, over which a model larger than
one GPU spreads) and rank 0 reports the combined result, the same as one process's.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List, Optional

from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from
from colossal_llama.utils.errors import UserInputError, cli_entry
from colossal_llama.utils.output import check_output_file
from colossal_llama.utils.paths import data_root
from colossal_llama.utils.ranks import Ranks


def _subcommand(sub, name: str, help: str, config_cls) -> argparse.ArgumentParser:
    """A subcommand with the model flags, ``--output`` and the flags of its typed config."""
    from colossal_llama.inference.cli import add_model_args

    p = sub.add_parser(name, help=help)
    add_model_args(p)
    p.add_argument("--output", default=None, help="write the full report as JSON here (missing folders are made)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output report")
    add_flags(p, config_cls)
    return p


def build_parser() -> argparse.ArgumentParser:
    from colossal_llama.eval.bits_per_char import BpcConfig
    from colossal_llama.eval.multiple_choice import MCConfig

    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    mc = _subcommand(sub, "mc", "multiple-choice accuracy (MMLU format): answer-letter logits or cloze", MCConfig)
    mc.add_argument("--data", default=None,
                    help="jsonl with question, answer_a..answer_d, correct_answer, topic "
                         "(default: the data folder's eval/mmlu_test.jsonl)")
    bpc = _subcommand(sub, "bpc", "bits per character of held-out jsonl text", BpcConfig)
    bpc.add_argument("--data", nargs="+", required=True,
                     help="jsonl file(s) of held-out text, read as they are scored (memory does not grow with them); "
                          "several files are reported one by one and in all")
    return p


def _positive(name: str, value: Optional[int], minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UserInputError(f"--{name}: must be >= {minimum}, got {value}")


def read_mc(args):
    """mc's flags and questions, checked before any model loads: ``(MCConfig, items)``."""
    from colossal_llama.eval.multiple_choice import MCConfig, load_mc_items

    _positive("max_per_subject", args.max_per_subject)
    _positive("k_shot", args.k_shot, 0)
    return config_from(args, MCConfig), load_mc_items(args.data)


def run_mc(args, inputs, model, tokenizer, ranks: Ranks) -> dict:
    from colossal_llama.eval.multiple_choice import evaluate_multiple_choice

    config, items = inputs
    result = evaluate_multiple_choice(model, tokenizer, items, config, ranks)
    report = result.to_dict()
    if not ranks.is_main:
        return report
    width = max(len(s) for s in report["subjects"])
    print(f"{'subject':<{width}}  correct  total  accuracy")
    for name, row in report["subjects"].items():
        print(f"{name:<{width}}  {row['correct']:>7}  {row['total']:>5}  {row['accuracy']:>8.1%}")
    print(f"mc: {args.model_path} accuracy {result.accuracy:.1%} ({result.correct}/{result.total}) "
          f"over {len(report['subjects'])} subject(s), {args.k_shot}-shot {args.method}{_fewer_shots(result)}, "
          "chance 25.0%")
    _print_shares(result.batches_per_process)
    return report


def _fewer_shots(result) -> str:
    """`` (fewer examples in prompts: N from subjects ..., M cut ..., of T)`` when some prompts did not get
    ``--k_shot`` examples (the summary must not claim k-shot for them), else ""."""
    reasons = [f"{n} {why}" for n, why in ((result.shots_short, "from subjects with too few questions"),
                                           (result.shots_reduced, "cut to fit --max_length")) if n]
    return f" (fewer examples in prompts: {', '.join(reasons)}, of {result.total})" if reasons else ""


def _print_shares(batches_per_process: List[int]) -> None:
    if len(batches_per_process) > 1:
        print(f"batches per process (rank order): {', '.join(map(str, batches_per_process))}")


def read_bpc(args):
    """bpc's flags, and one pass over each file checking every row, before any model loads:
    ``(BpcConfig, [(file, TextScan)])`` (the texts themselves are read again, streaming, while they are scored)."""
    from colossal_llama.eval.bits_per_char import BpcConfig, scan_texts

    _positive("max_samples", args.max_samples)
    _positive("window", args.window, 2)
    _positive("stride", args.stride)  # its upper bound depends on the model's context: bits_per_char clamps it
    _positive("chunk_tokens", args.chunk_tokens)
    config = config_from(args, BpcConfig)
    return config, [(path, scan_texts(path, config.text_field, config.max_samples, config.group_by))
                    for path in args.data]


def _group_names(scans) -> List[tuple]:
    """``(file, group, name)`` of every group to score: a file is named by its file name (by its path where two
    share a name), a value of ``--group_by`` by itself (``file:value`` when there are several files)."""
    names = [Path(path).name for path, _ in scans]
    files = names if len(set(names)) == len(names) else [str(path) for path, _ in scans]
    return [(path, group, file if group is None else f"{file}:{group}" if len(scans) > 1 else group)
            for file, (path, scan) in zip(files, scans) for group in scan.groups]


def run_bpc(args, inputs, model, tokenizer, ranks: Ranks) -> dict:
    """Each file (and each ``--group_by`` value) scored on its own, in the order read; the total adds them up.
    With ``--group_by``, or several files, the groups are printed as a table and returned under ``groups``."""
    from colossal_llama.eval.bits_per_char import BpcResult, bits_per_char, iter_texts

    config, scans = inputs
    characters = {(path, group): counts[1] for path, scan in scans for group, counts in scan.groups.items()}
    groups = {}
    for path, group, name in _group_names(scans):
        texts = iter_texts(path, config.text_field, config.max_samples, group_field=config.group_by, group=group)
        groups[name] = bits_per_char(model, tokenizer, texts, config, ranks, characters[path, group],
                                     desc=f"bpc {name}")
    result = BpcResult.total([*groups.values(), *(BpcResult(skipped=scan.skipped) for _, scan in scans)])
    report = result.to_dict()
    # --group_by always reports its groups, one included: a script reading groups[value] must not depend on how
    # many values a file happens to hold; several files are groups of their own even without it
    tabled = config.group_by is not None or len(groups) > 1
    if tabled:
        report["groups"] = {name: r.to_dict() for name, r in groups.items()}
    if not ranks.is_main:
        return report
    if tabled:
        width = max(len(n) for n in groups)
        print(f"{'group':<{width}}  {'texts':>6}  {'characters':>10}  {'tokens':>9}  chars/token  bits/char")
        for name, r in groups.items():
            print(f"{name:<{width}}  {r.texts:>6}  {r.characters:>10}  {r.tokens:>9}  "
                  f"{r.characters / r.tokens:>11.2f}  {r.bpc:>9.4f}")
    skipped_note = f", skipped {result.skipped}" if result.skipped else ""
    data = args.data[0] if len(args.data) == 1 else f"{len(args.data)} files"
    print(f"bpc: {args.model_path} on {data}: {result.bpc:.4f} bits/char over {result.texts} texts, "
          f"{result.characters} chars, {result.tokens} tokens ({result.characters / result.tokens:.2f} chars/token)"
          f"{skipped_note}")
    _print_shares(result.batches_per_process)
    return report


def check_report_path(output: Optional[str], overwrite: bool) -> None:
    """``--output`` before the model loads (an evaluation can run for hours, then fail to write its report)."""
    if output is not None:
        check_output_file(output, "--output", overwrite)


def write_report(output: str, report: dict) -> None:
    """Write the JSON report atomically: an interrupted write leaves the old report (or none), never half."""
    from colossal_llama.utils.durable import replace_file

    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    replace_file(target, json.dumps(report, indent=2, ensure_ascii=False))
    print(f"report written to {target}")


COMMANDS = {"mc": (read_mc, run_mc), "bpc": (read_bpc, run_bpc)}  # (read flags and data, evaluate and report)


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    from colossal_llama.inference.loading import load_model_and_tokenizer
    from colossal_llama.inference.placement import placement_for

    args = build_parser().parse_args(argv)
    if args.data is None:  # resolved here, not in the parser: --help never looks for (or announces) data
        args.data = str(data_root() / "eval" / "mmlu_test.jsonl")
    _positive("batch_size", args.batch_size)
    files = [args.data] if isinstance(args.data, str) else args.data
    for k, path in enumerate(files):
        if not Path(path).is_file():
            raise UserInputError(f"--data {path}: no such file")
        if Path(path).resolve() in [Path(f).resolve() for f in files[:k]]:
            raise UserInputError(f"--data {path}: given twice")
    check_report_path(args.output, args.overwrite)
    read, run = COMMANDS[args.command]
    inputs = read(args)  # a bad flag or row stops the run before a (possibly 70B) model is loaded
    ranks = Ranks.join()
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    placement = placement_for(args.device, ranks.local_size, ranks.local_rank, args.max_gpu_memory)
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.tokenizer_path, placement)
    report = run(args, inputs, model, tokenizer, ranks)
    ranks.close()
    if args.output and ranks.is_main:
        write_report(args.output, {"command": args.command, "model_path": args.model_path, **report})
    return 0


if __name__ == "__main__":
    main()

"""Command lines of ``prepare_pretrain_dataset.py`` and ``prepare_sft_dataset.py``.

Under ``torchrun`` / ``colossalai run`` (``WORLD_SIZE`` and ``RANK`` set) each process prepares its own shard
of the input, so ``colossalai run --hostfile H prepare_pretrain_dataset.py ...`` spreads the work over nodes.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig, SFTPrepConfig, Shard
from colossal_llama.dataset.pipeline import prepare_pretrain, prepare_sft
from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from
from colossal_llama.utils.errors import UserInputError, cli_entry


def _common_parser(description: str, config_cls) -> argparse.ArgumentParser:
    """Inputs, outputs and shards by hand (they become paths, a layout and a shard); the rest from ``config_cls``."""
    p = OneLineErrorParser(description=description)
    p.add_argument("--data_input_dirs", required=True, help="comma-separated dirs (or files) of jsonl[.gz|.zst]")
    p.add_argument("--tokenizer_dir", required=True)
    p.add_argument("--data_output_dirs", help="OUT: writes OUT/{cache,jsonl,arrow} and OUT/manifest.json "
                                              "(with --num_shards N > 1: OUT/shard-IIIII-of-NNNNN/...)")
    p.add_argument("--data_cache_dir", help="the token cache's folder: with OUT instead of OUT/cache (a machine's local "
                                            "disk: the parts are written by reading it back at random; a shard uses "
                                            "DIR/shard-IIIII-of-NNNNN); the older form: with the two below instead "
                                            "of OUT")
    p.add_argument("--data_jsonl_output_dir", help="older form: jsonl mirror dir")
    p.add_argument("--data_arrow_output_dir", help="older form: arrow dir (manifest goes to its parent)")
    p.add_argument("--num_shards", type=int, default=None,
                   help="split the input documents over N independent runs (default: WORLD_SIZE, else 1)")
    p.add_argument("--shard_index", type=int, default=None, help="which shard this run writes (default: RANK)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strict", dest="strict", action="store_true", default=True,
                      help="(default) stop at the first invalid row or empty part with file:line: field")
    mode.add_argument("--skip_invalid", dest="strict", action="store_false",
                      help="skip invalid rows and empty parts, counting them by reason in the summary")
    add_flags(p, config_cls)
    return p


def _layout(args, shard: Shard) -> OutputLayout:
    triple = (args.data_cache_dir, args.data_jsonl_output_dir, args.data_arrow_output_dir)
    if args.data_output_dirs and (args.data_jsonl_output_dir or args.data_arrow_output_dir):
        raise UserInputError("give either --data_output_dirs (and maybe --data_cache_dir) or the three --data_*_dir "
                             "flags, not both")
    if args.data_output_dirs:
        if "," in args.data_output_dirs:
            raise UserInputError("--data_output_dirs: exactly one output directory is supported")
        layout = OutputLayout.under(args.data_output_dirs, shard)
        if not args.data_cache_dir:
            return layout
        cache = Path(args.data_cache_dir)  # one folder per shard: machines sharing it never meet there
        return dataclasses.replace(layout, cache_dir=cache / shard.dir_name if shard.count > 1 else cache)
    if not all(triple):
        raise UserInputError("an output is required: --data_output_dirs OUT (or all of --data_cache_dir, "
                             "--data_jsonl_output_dir, --data_arrow_output_dir)")
    if shard.count > 1:
        raise UserInputError(f"{shard.count} shards need --data_output_dirs OUT (each shard writes OUT/shard-*/)")
    return OutputLayout(*(Path(p) for p in triple))


def _config(args, config_cls, **others):
    shard = Shard.from_launcher(args.num_shards, args.shard_index)
    return config_from(args, config_cls, input_dirs=[d.strip() for d in args.data_input_dirs.split(",") if d.strip()],
                       tokenizer_dir=args.tokenizer_dir, output=_layout(args, shard), strict=args.strict, shard=shard,
                       **others)


def _run_cli(prepare, config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(config)
    return 0


@cli_entry
def pretrain_main(argv=None) -> int:
    """CLI of ``prepare_pretrain_dataset.py``."""
    p = _common_parser("Tokenise and pack pre-training jsonl into arrow parts.", PretrainPrepConfig)
    args = p.parse_args(argv)
    return _run_cli(prepare_pretrain, _config(args, PretrainPrepConfig))


@cli_entry
def sft_main(argv=None) -> int:
    """CLI of ``prepare_sft_dataset.py``."""
    p = _common_parser("Template and tokenise SFT conversations into arrow parts.", SFTPrepConfig)
    p.add_argument("--llama_version", type=int, choices=(2, 3), default=None,
                   help="chat template llama2 or llama3 (default 3 unless --chat_template is given)")
    p.add_argument("--chat_template", choices=("llama2", "llama3", "tokenizer"), default=None,
                   help="'tokenizer' uses the tokenizer's own chat_template")
    args = p.parse_args(argv)
    by_version = f"llama{args.llama_version}" if args.llama_version else None
    if by_version and args.chat_template and by_version != args.chat_template:
        raise UserInputError(f"--llama_version {args.llama_version} contradicts --chat_template {args.chat_template}")
    template = args.chat_template or by_version or "llama3"
    config = _config(args, SFTPrepConfig, chat_template=template)
    return _run_cli(prepare_sft if args.chat_template or by_version else _prepare_sft_by_default, config)


def _prepare_sft_by_default(config: SFTPrepConfig):
    """``prepare_sft`` with the template chosen for the user named first: its warnings then make sense to them."""
    logging.getLogger(__name__).info("chat template llama3 (--llama_version 3, the default)")
    return prepare_sft(config)

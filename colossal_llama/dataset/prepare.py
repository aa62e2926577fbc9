"""Entry points of data preparation under their historical module name (console scripts, older imports).

The pipeline is :mod:`colossal_llama.dataset.pipeline`, the command lines :mod:`colossal_llama.dataset.cli`,
the token accounting :mod:`colossal_llama.dataset.accounting`.
"""
from colossal_llama.dataset.accounting import format_summary
from colossal_llama.dataset.cli import pretrain_main, sft_main
from colossal_llama.dataset.pipeline import PrepSummary, prepare_pretrain, prepare_sft

__all__ = ["PrepSummary", "format_summary", "prepare_pretrain", "prepare_sft", "pretrain_main", "sft_main"]

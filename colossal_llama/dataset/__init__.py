"""Data preparation: pre-training packing and SFT templating into the arrow/jsonl/manifest layout.

Entry points live in :mod:`colossal_llama.dataset.prepare` (``prepare_pretrain``, ``prepare_sft``,
``pretrain_main``, ``sft_main``); chat templates in :mod:`colossal_llama.dataset.chat_templates`; reading
prepared output back in :mod:`colossal_llama.dataset.prepared`. Nothing heavy is imported here, so
``chat_templates`` can be used by inference without pulling in ``datasets``.
"""

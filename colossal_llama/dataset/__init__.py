"""Data preparation: pre-training packing and SFT templating into the arrow/jsonl/manifest layout.

:mod:`~colossal_llama.dataset.pipeline` runs a preparation (``prepare_pretrain``, ``prepare_sft``) and
:mod:`~colossal_llama.dataset.cli` is its command line (``pretrain_main``, ``sft_main``); reading input is
:mod:`~colossal_llama.dataset.records`, the on-disk token cache :mod:`~colossal_llama.dataset.token_cache`,
packing and bins :mod:`~colossal_llama.dataset.packing`, writing :mod:`~colossal_llama.dataset.writing`, the
token accounting :mod:`~colossal_llama.dataset.accounting`, ``manifest.json``
:mod:`~colossal_llama.dataset.manifest`, reading prepared output back :mod:`~colossal_llama.dataset.prepared`;
chat templates :mod:`~colossal_llama.dataset.chat_templates`. Nothing heavy is imported here, so
``chat_templates`` can be used by inference without pulling in ``datasets``.
"""

"""Turn user text into prompt token ids: raw (``pretrained``) or wrapped in the model's chat template (``sft``).

The chat template is the one the SFT data was prepared with. Its choice, in order:
1. ``colossal_llama_chat.json`` in the model folder (training copies it from the data manifest); a
   ``--chat_template`` naming another is ignored, with a warning,
2. ``--chat_template`` (``llama2`` | ``llama3`` | ``tokenizer``),
3. the tokenizer's own ``chat_template`` (name ``tokenizer``).
``--system_message`` overrides the system message stored in the model folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

from colossal_llama.dataset.chat_templates import CHAT_CONFIG_FILE, TEMPLATE_NAMES, get_chat_template
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import read_json

logger = logging.getLogger(__name__)

PROMPT_STYLES = ("sft", "pretrained")


def read_chat_config(model_path) -> Optional[dict]:
    """The ``{"name", "system_message"}`` block saved with the model, or None when the model has none."""
    path = Path(model_path) / CHAT_CONFIG_FILE
    if not path.is_file():
        return None
    block = read_json(path)
    if not isinstance(block, dict) or block.get("name") not in TEMPLATE_NAMES:
        raise UserInputError(f"{path}: name: expected one of {', '.join(TEMPLATE_NAMES)}, got {block!r}")
    return block


def resolve_chat_template(model_path, tokenizer, chat_template: Optional[str] = None,
                          system_message: Optional[str] = None):
    """The ``ChatTemplate`` to use with this model (see the module docstring for the order of precedence)."""
    saved = read_chat_config(model_path) if model_path is not None else None
    if saved is not None:
        name, default_system = saved["name"], saved.get("system_message")
        if chat_template is not None and chat_template != name:  # the model knows only the template it learned
            logger.warning(f"--chat_template {chat_template} is ignored: {Path(model_path) / CHAT_CONFIG_FILE} says "
                           f"the model was trained with the chat template {name}")
    elif chat_template is not None:
        name, default_system = chat_template, None
    elif getattr(tokenizer, "chat_template", None):
        name, default_system = "tokenizer", None
    else:
        raise UserInputError(
            f"{model_path}: no {CHAT_CONFIG_FILE}, no --chat_template and the tokenizer has no chat_template; "
            "pass --chat_template llama2|llama3 or use --prompt_style pretrained"
        )
    if name not in TEMPLATE_NAMES:
        raise UserInputError(f"--chat_template: expected one of {', '.join(TEMPLATE_NAMES)}, got {name!r}")
    return get_chat_template(name, tokenizer, system_message if system_message is not None else default_system)


def pretrained_prompt_ids(tokenizer, text: str) -> List[int]:
    """Plain continuation prompt: the tokenizer's usual encoding (with BOS when the tokenizer adds one)."""
    return tokenizer(text)["input_ids"]


def sft_prompt_ids(template, text: str) -> List[int]:
    """A single human turn wrapped in the chat template, ending with the assistant header."""
    return template.encode_prompt([{"from": "human", "content": text}])

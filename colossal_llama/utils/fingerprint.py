"""A stable fingerprint of a tokenizer, written by data preparation and checked by training."""
from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (piece -> id) and the special-token ids.

    Two tokenizers with the same fingerprint map every piece to the same id, so data prepared with one
    trains correctly with the other.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    payload = json.dumps({"vocab": vocab, "specials": specials}, ensure_ascii=False, sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()

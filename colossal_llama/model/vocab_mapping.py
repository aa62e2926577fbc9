"""How an expanded tokenizer's new tokens map onto the source tokenizer's pieces.

A new token (say ``你好``) gets the mean of the source rows of the pieces the *source* tokenizer splits it
into. We split the token as it would appear in the middle of a text, in the source model's own alphabet:

- a token in the target's model vocabulary (a SentencePiece piece appended to the proto, or a byte-level
  BPE entry such as ``ä½łå¥½``) is already spelled in that alphabet, so the source model splits it directly;
- an *added* token (``tokenizer.add_tokens``) holds raw text: it is first spelled the way the source
  pre-processing spells mid-text characters (byte-level mapping; ``' ' -> '▁'`` for SentencePiece).

Splitting mid-text matters for SentencePiece sources: ``encode("你好")`` prepends the dummy-prefix piece
``▁`` (``['▁', '你', '好']``), but ``你好`` inside a sentence is ``['你', '好']``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Set

from colossal_llama.utils.errors import UserInputError


def check_is_expansion(source_tokenizer, target_tokenizer, source_path: Path, target_path: Path) -> None:
    """Raise a one-line :class:`UserInputError` unless every source piece keeps its id in the target."""
    source_vocab = source_tokenizer.get_vocab()
    target_vocab = target_tokenizer.get_vocab()
    changed = [(piece, idx, target_vocab.get(piece)) for piece, idx in source_vocab.items()
               if target_vocab.get(piece) != idx]
    if changed:
        changed.sort(key=lambda c: c[1])
        piece, old_id, new_id = changed[0]
        now = "missing" if new_id is None else f"id {new_id}"
        raise UserInputError(
            f"{target_path}: not an expansion of the source tokenizer {source_path}: {len(changed)} source "
            f"piece(s) changed id, e.g. {piece!r} is id {old_id} in the source and {now} in the target"
        )
    if len(target_tokenizer) < len(source_tokenizer):
        raise UserInputError(f"{target_path}: has {len(target_tokenizer)} tokens, fewer than the source's "
                             f"{len(source_tokenizer)}")


def source_piece_ids(source_tokenizer, target_tokenizer, new_ids: Iterable[int], target_path: Path) -> List[List[int]]:
    """For each target id in ``new_ids``, the source ids of its pieces (mid-text split, no special tokens).

    Returns one list per new id, in order; a list is empty only if the source splits the token into nothing.
    """
    new_ids = list(new_ids)
    source_backend = source_tokenizer.backend_tokenizer
    target_model_vocab = target_tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    added = target_tokenizer.added_tokens_decoder  # id -> AddedToken
    spell = _mid_text_speller(source_backend)
    pieces = target_tokenizer.convert_ids_to_tokens(new_ids)
    result = []
    for token_id, piece in zip(new_ids, pieces):
        if piece is None:
            raise UserInputError(f"{target_path}: token id {token_id} has no piece (ids must be contiguous)")
        if token_id in added and target_model_vocab.get(piece) != token_id:
            spelled = spell(added[token_id].content)
        else:
            spelled = [piece]
        result.append([tok.id for chunk in spelled for tok in source_backend.model.tokenize(chunk)])
    return result


def _mid_text_speller(backend):
    """A function ``text -> [chunks in the model alphabet]`` for raw text found mid-sentence."""
    spec = json.loads(backend.to_str())
    types = _component_types(spec.get("normalizer")) | _component_types(spec.get("pre_tokenizer"))
    if "Prepend" in types or "Metaspace" in types:
        # SentencePiece layout: spaces are '▁'; the dummy prefix belongs to the start of a text, not to a token.
        return lambda text: [text.replace(" ", "\u2581")] if text else []
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer

    def spell(text: str) -> List[str]:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        if pre_tokenizer is None:
            return [text] if text else []
        return [chunk for chunk, _ in pre_tokenizer.pre_tokenize_str(text)]

    return spell


def _component_types(spec) -> Set[str]:
    """All ``type`` names in a (possibly nested ``Sequence``) tokenizers component spec."""
    if not spec:
        return set()
    found = {spec.get("type", "")}
    for key in ("normalizers", "pretokenizers"):
        for child in spec.get(key) or []:
            found |= _component_types(child)
    return found

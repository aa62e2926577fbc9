"""Append pieces to a SentencePiece BPE ``ModelProto`` so that the converted HF fast tokenizer agrees with it.

Why component characters are added: SentencePiece's BPE starts from single characters (unknown ones included,
byte-fallback happens only at the end) and merges any adjacent pair whose concatenation is a piece. The HF
fast tokenizer converted from the proto instead turns a character that is not a piece into its UTF-8 bytes
*first* and only knows merges whose two halves are both pieces. So a new word ``天气`` with ``气`` not a piece is
one token for sentencepiece but ``天`` + 3 bytes for HF. Adding every missing single character of a new piece
(counted and reported) closes that gap: both tokenizers then see the same symbols and the same merges.

Why bridge pieces are added: BPE builds a piece only by merging two pieces. A new word whose every split has a
half that is not a piece (``天安门`` when neither ``天安`` nor ``安门`` is one) can never be emitted and its
embedding row would stay untrained. For such words the split needing the fewest new pieces is chosen and the
missing halves are appended after all requested pieces (recursively, counted and reported as bridges), so
every requested piece is reachable while requested ids keep the file's order.

Scores: new pieces get scores below every existing piece, decreasing in file order. Existing merges therefore
keep priority (text without the new pieces tokenises exactly as before) and earlier pieces in the file win
ties over later ones. Scores are stored as float32 and LLaMA-style models hold sentinel scores of -1e9 (runs of
spaces), where float32 steps are 64 apart, so each new score is the next float32 below the previous one:
unique, hence the HF merge ranks derived from them order exactly like sentencepiece's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from colossal_llama.tokenizer.base_vocab import text_to_sp_piece

NORMAL_PIECE = 1  # sentencepiece_model_pb2.ModelProto.SentencePiece.Type.NORMAL


@dataclass
class SpAppendResult:
    """What :func:`append_pieces` did. ``added`` are the requested pieces that got new ids (proto order)."""

    added: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    component_chars: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)


def append_pieces(proto, pieces: list[str], add_component_chars: bool = True) -> SpAppendResult:
    """Append ``pieces`` (text spelling; spaces become ``'▁'``) to ``proto`` in place.

    Invariants: ids ``0 .. len(proto.pieces)-1`` before the call keep their piece, score and type; each new
    piece appears once; the order is deterministic (file order, a word's missing characters right before it,
    then the bridges). With ``add_component_chars`` every added piece is reachable by two-piece merges; without it,
    ``unreachable`` lists those that no merge chain can build (neither tokenizer will ever emit them).
    """
    vocab = {p.piece for p in proto.pieces}
    next_score = _below(min(p.score for p in proto.pieces))
    result = SpAppendResult()

    def add(piece: str) -> None:
        nonlocal next_score
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, next_score, NORMAL_PIECE
        next_score = _below(next_score)
        vocab.add(piece)

    for text in pieces:
        piece = text_to_sp_piece(text)
        if piece in vocab:
            result.already_present.append(text)
            continue
        if add_component_chars and len(piece) > 1:
            for char in piece:
                if char not in vocab:
                    add(char)
                    result.component_chars.append(char)
        add(piece)
        result.added.append(text)
    if add_component_chars:
        # After every requested piece, so their ids follow the file and bridges rank below all of them: a
        # bridge only completes a word no existing merge could build, it never outranks a requested piece.
        for text in result.added:
            for bridge in _bridges(text_to_sp_piece(text), vocab):
                add(bridge)
                result.bridges.append(bridge)
    result.unreachable = [t for t in result.added if not _reachable(text_to_sp_piece(t), vocab, {})]
    return result


def _bridges(piece: str, vocab: set[str]) -> list[str]:
    """Pieces to add (in order) so that ``piece`` becomes reachable; [] when it already is.

    Assumes every single character of ``piece`` is in ``vocab``. Picks the split with the fewest missing halves
    (ties: the earliest split point), then makes each missing half reachable the same way.
    """
    if len(piece) == 1 or _reachable(piece, vocab, {}):
        return []
    memo: dict[str, bool] = {}
    splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]

    def cost(halves) -> int:
        return sum(1 for h in halves if h not in vocab or not _reachable(h, vocab, memo))

    best = min(splits, key=cost)
    added: list[str] = []
    for half in best:
        if half in vocab and _reachable(half, vocab, memo):
            continue
        extra = _bridges(half, vocab | set(added))
        added.extend(extra)
        if half not in vocab and half not in added:
            added.append(half)
    return added


def _reachable(piece: str, vocab: set[str], memo: dict[str, bool]) -> bool:
    """True when ``piece`` is one character or splits into two reachable pieces of ``vocab``."""
    if len(piece) == 1:
        return True
    if piece not in memo:
        memo[piece] = any(
            piece[:i] in vocab and piece[i:] in vocab and _reachable(piece[:i], vocab, memo) and _reachable(piece[i:], vocab, memo)
            for i in range(1, len(piece))
        )
    return memo[piece]


def _below(score: float) -> float:
    """The largest float32 strictly below ``score`` (proto scores are float32)."""
    return float(np.nextafter(np.float32(score), np.float32(-np.inf)))

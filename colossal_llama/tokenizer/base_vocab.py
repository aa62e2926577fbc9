"""What kind of tokenizer a folder holds and which texts its vocabulary already covers.

Two kinds are supported:
- ``"sentencepiece"``: a LLaMA-2 style folder with ``tokenizer.model`` (the SentencePiece model is the source
  of truth even when a converted ``tokenizer.json`` sits beside it);
- ``"bpe"``: a HF fast tokenizer folder with ``tokenizer.json`` and no ``tokenizer.model`` (LLaMA-3, SmolLM2).
"""
from __future__ import annotations

from pathlib import Path

from colossal_llama.utils.errors import UserInputError

SP_MODEL = "tokenizer.model"
HF_TOKENIZER_JSON = "tokenizer.json"
SP_SPACE = "\u2581"  # '▁', SentencePiece's visible space


def tokenizer_kind(tokenizer_dir: Path) -> str:
    """``"sentencepiece"`` or ``"bpe"``; a one-line :class:`UserInputError` when the folder holds neither."""
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise UserInputError(f"{tokenizer_dir}: tokenizer directory does not exist")
    if (tokenizer_dir / SP_MODEL).is_file():
        return "sentencepiece"
    if (tokenizer_dir / HF_TOKENIZER_JSON).is_file():
        return "bpe"
    raise UserInputError(f"{tokenizer_dir}: holds neither {SP_MODEL} (SentencePiece) nor {HF_TOKENIZER_JSON} (HF fast)")


def load_sp_proto(model_path: Path):
    """Parse a SentencePiece ``ModelProto`` with the protobuf module sentencepiece itself ships.

    That module is generated for current protobuf, so no ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION`` is needed.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_path).read_bytes())
    except Exception as err:  # protobuf raises DecodeError, a bare Exception subclass
        raise UserInputError(f"{model_path}: not a SentencePiece model ({err})") from None
    if not proto.pieces:
        raise UserInputError(f"{model_path}: SentencePiece model has no pieces")
    return proto


def sp_piece_to_text(piece: str) -> str:
    """SentencePiece piece -> the text it stands for (``'▁the'`` -> ``' the'``)."""
    return piece.replace(SP_SPACE, " ")


def text_to_sp_piece(text: str) -> str:
    """Text -> SentencePiece piece spelling (spaces become ``'▁'``), the inverse of :func:`sp_piece_to_text`."""
    return text.replace(" ", SP_SPACE)


def bpe_vocab_texts(tokenizer) -> set[str]:
    """Decoded text of every vocabulary entry of a HF fast tokenizer (byte-level entries decoded to UTF-8).

    Entries that are partial UTF-8 sequences decode to text holding U+FFFD and never equal a real piece.
    """
    decoder = tokenizer.backend_tokenizer.decoder
    texts = set()
    for token in tokenizer.get_vocab():
        texts.add(decoder.decode([token]) if decoder is not None else token)
    return texts


def base_vocab_texts(tokenizer_dir: Path) -> tuple[str, set[str]]:
    """``(kind, texts)``: the texts the base vocabulary covers, spelled as pieces files spell them.

    For SentencePiece bases these are the SP pieces with ``'▁'`` shown as a space; for BPE bases the decoded
    text of the vocabulary entries (including added tokens).
    """
    kind = tokenizer_kind(tokenizer_dir)
    if kind == "sentencepiece":
        proto = load_sp_proto(Path(tokenizer_dir) / SP_MODEL)
        return kind, {sp_piece_to_text(p.piece) for p in proto.pieces}
    from colossal_llama.tokenizer.loading import load_tokenizer

    return kind, bpe_vocab_texts(load_tokenizer(tokenizer_dir))

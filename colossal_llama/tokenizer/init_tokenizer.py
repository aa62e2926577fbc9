"""Expand a tokenizer's vocabulary with new pieces (Colossal-LLaMA step 1), verified and reported.

SentencePiece sources (LLaMA-2 style ``tokenizer.model``): the pieces are appended to the ``ModelProto``
(see :mod:`colossal_llama.tokenizer.sp_expand` for scores and the component characters that keep the HF fast
tokenizer in agreement); ``tokenizer.json`` is then converted by transformers from the expanded model and
checked against sentencepiece, line by line, on real text.

HF fast BPE sources (LLaMA-3 / SmolLM2 style byte-level ``tokenizer.json``): the pieces become ordinary
(non-special) *added tokens*, ids ``len(tokenizer), len(tokenizer)+1, ...`` in file order. Why not new merges:
a byte-level word needs a chain of merges whose intermediate byte strings would each cost a vocabulary row,
so the vocabulary would grow by more than the pieces asked for and the chain can still be blocked by existing
merges in context. Added tokens leave the BPE model (vocab, merges, ids) bit-identical, give exactly one id per
piece and always apply. The trade-off: added tokens are matched in the raw text before pre-tokenisation
(leftmost-longest), so they suit pieces that are whole words of scripts written without spaces (Chinese);
an English fragment such as ``ing`` would also be cut out of ``string``. The check for BPE sources is that
``decode(encode(text)) == text`` on every sampled line.

Pieces are text: a word-start marker copied from a vocabulary (``'▁'`` anywhere, a leading ``'Ġ'``) is read as the
space it stands for, for either kind of base (:func:`colossal_llama.tokenizer.pieces.marker_as_space`), so
``'▁上海'`` and ``'Ġ上海'`` both add the piece ``' 上海'``, never a literal marker that real text never contains.

Pieces already covered by the base vocabulary (SP piece, or decoded text of a BPE entry) are skipped and
counted, never errors. The target is built in a temporary folder and only moved into place when complete.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from colossal_llama.tokenizer.base_vocab import SP_MODEL, bpe_vocab_texts, load_sp_proto, tokenizer_kind
from colossal_llama.tokenizer.pieces import marker_as_space, read_pieces_file
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.tokenizer.report_corpus import (
    LANGUAGES,
    TextSample,
    chars_per_token,
    default_report_files,
    sample_texts,
)
from colossal_llama.tokenizer.sp_expand import append_pieces
from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from, flag
from colossal_llama.utils.durable import fsync_dir, fsync_tree
from colossal_llama.utils.errors import DataError, UserInputError, cli_entry
from colossal_llama.utils.json_files import read_json, write_json
from colossal_llama.utils.output import check_output_file

DEFAULT_REPORT_MAX_CHARS = 100_000
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
LLAMA_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


@dataclass
class ExpansionReport:
    """Everything expansion did, in numbers.

    ``vocab_after == vocab_before + pieces_added + component_chars_added + bridge_pieces_added``.
    """

    kind: str  # "sentencepiece" or "bpe"
    source_dir: str
    target_dir: str
    vocab_before: int
    vocab_after: int
    pieces_requested: int  # distinct pieces given
    pieces_added: int
    pieces_already_present: int
    duplicates: int  # repeated pieces in the pieces file (dropped before expansion)
    component_chars_added: int = 0  # SentencePiece only: single characters added so HF agrees (module doc)
    bridge_pieces_added: int = 0  # SentencePiece only: sub-words added so every requested piece is reachable
    unreachable_pieces: list[str] = field(default_factory=list)  # SentencePiece only: no merge chain builds them
    sample_chars: dict[str, int] = field(default_factory=dict)  # per language
    chars_per_token: dict[str, dict[str, float]] = field(default_factory=dict)  # lang -> {"before", "after"}
    check: str = ""  # what was compared on the sample
    check_identical: int = 0
    check_total: int = 0
    first_mismatch: Optional[str] = None

    @property
    def agrees(self) -> bool:
        return self.check_identical == self.check_total

    def format(self) -> str:
        """Human-readable multi-line summary (what the CLI prints)."""
        lines = [
            f"tokenizer expansion ({self.kind}): {self.source_dir} -> {self.target_dir}",
            f"vocabulary: {self.vocab_before} -> {self.vocab_after} (+{self.vocab_after - self.vocab_before})",
            f"pieces: {self.pieces_requested} distinct requested, {self.pieces_added} added, "
            f"{self.pieces_already_present} skipped as already present, {self.duplicates} duplicates in file",
        ]
        if self.kind == "sentencepiece":
            lines.append(f"component characters added (so HF fast agrees with sentencepiece): {self.component_chars_added}")
            lines.append(f"bridge pieces added (so every requested piece can be merged): {self.bridge_pieces_added}")
            if self.unreachable_pieces:
                lines.append(
                    f"warning: {len(self.unreachable_pieces)} added pieces cannot be built by any merge chain and will "
                    f"never be emitted, e.g. {self.unreachable_pieces[:5]}"
                )
        for lang in LANGUAGES:
            cpt = self.chars_per_token.get(lang)
            if cpt:
                lines.append(
                    f"chars/token {lang}: {cpt['before']:.3f} -> {cpt['after']:.3f} "
                    f"({self.sample_chars.get(lang, 0)} chars sampled)"
                )
        lines.append(f"{self.check}: {self.check_identical}/{self.check_total} lines identical")
        if self.first_mismatch:
            lines.append(f"first difference: {self.first_mismatch}")
        return "\n".join(lines)


class TokenizerMismatchError(UserInputError):
    """The written tokenizer does not reproduce the reference on the sample; ``report`` says where."""

    def __init__(self, report: ExpansionReport):
        self.report = report
        super().__init__(
            f"{report.target_dir}: {report.check} failed on {report.check_total - report.check_identical}/"
            f"{report.check_total} sample lines (first: {report.first_mismatch}); target not written, "
            f"pass --allow_mismatch to keep it anyway"
        )


def expand_tokenizer(
    source_dir: Path,
    target_dir: Path,
    pieces: list[str],
    overwrite: bool = False,
    *,
    duplicates: int = 0,
    report_files: Optional[list[Path]] = None,
    report_max_chars: int = DEFAULT_REPORT_MAX_CHARS,
    add_component_chars: bool = True,
    allow_mismatch: bool = False,
) -> ExpansionReport:
    """Write ``source_dir``'s tokenizer expanded with ``pieces`` to ``target_dir`` and report on it.

    ``pieces`` are texts (spaces allowed; SentencePiece spells them ``'▁'``), in the order ids are given; markers
    are read as spaces (:func:`marker_as_space`) and the pieces must then be distinct. ``report_files`` (jsonl or
    text) default to the bundled real pretraining corpora. Raises
    :class:`TokenizerMismatchError` (nothing written) when the check fails, unless ``allow_mismatch``.
    """
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    kind = tokenizer_kind(source_dir)
    _check_target(source_dir, target_dir, overwrite)
    pieces = [marker_as_space(p) for p in pieces]
    if len(set(pieces)) != len(pieces):
        raise UserInputError("expand_tokenizer: pieces must be distinct (read them with read_pieces_file)")
    sample = sample_texts(report_files if report_files is not None else default_report_files(), report_max_chars)
    if not sample.all_texts():
        raise UserInputError("no Chinese or English text to verify the tokenizer on: pass --report_corpus FILE")

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target_dir.name}.", dir=target_dir.parent) as tmp:
        build = _expand_sentencepiece if kind == "sentencepiece" else _expand_bpe
        report = build(source_dir, Path(tmp), pieces, sample, add_component_chars)
        report.source_dir, report.target_dir, report.duplicates = str(source_dir), str(target_dir), duplicates
        report.sample_chars = {lang: sample.n_chars[lang] for lang in LANGUAGES}
        if not report.agrees and not allow_mismatch:
            raise TokenizerMismatchError(report)
        _move_into_place(Path(tmp), target_dir)
    return report


def _check_target(source_dir: Path, target_dir: Path, overwrite: bool) -> None:
    if target_dir.resolve() == source_dir.resolve():
        raise UserInputError(f"{target_dir}: target tokenizer dir is the source dir; choose another folder")
    if target_dir.exists() and not target_dir.is_dir():
        raise UserInputError(f"{target_dir}: target exists and is not a directory")
    if target_dir.is_dir() and any(target_dir.iterdir()) and not overwrite:
        raise UserInputError(f"{target_dir}: target tokenizer dir exists and is not empty; pass --overwrite to replace it")


def _move_into_place(built: Path, target_dir: Path) -> None:
    """Replace the tokenizer files of ``target_dir`` by those in ``built``; other files there are left alone."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        stale = target_dir / name
        if stale.is_file() and not (built / name).exists():
            stale.unlink()
    fsync_tree(built)  # on disk before the names that publish them
    for path in sorted(built.iterdir()):
        os.replace(path, target_dir / path.name)
    fsync_dir(target_dir)


# ---------------------------------------------------------------- SentencePiece


def _expand_sentencepiece(source_dir, out_dir, pieces, sample: TextSample, add_component_chars) -> ExpansionReport:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    proto = load_sp_proto(source_dir / SP_MODEL)
    vocab_before = len(proto.pieces)
    config, special_map = _sp_source_config(source_dir, vocab_before)
    sp_before = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    appended = append_pieces(proto, pieces, add_component_chars=add_component_chars)
    model_bytes = proto.SerializeToString()
    (out_dir / SP_MODEL).write_bytes(model_bytes)
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json", special_map)

    # transformers converts tokenizer.model -> fast tokenizer (no tokenizer.json yet); save writes tokenizer.json
    AutoTokenizer.from_pretrained(str(out_dir), use_fast=True).save_pretrained(str(out_dir))
    hf = load_tokenizer(out_dir)  # exactly what data preparation and training will load
    if len(hf) != len(proto.pieces):  # e.g. a pad_token in special_tokens_map.json that is no SentencePiece piece
        extra = hf.convert_ids_to_tokens(list(range(len(proto.pieces), len(hf))))
        raise UserInputError(
            f"{source_dir}: its tokenizer files add {len(extra)} token(s) beyond the SentencePiece pieces "
            f"({', '.join(map(repr, extra[:5]))}); new pieces would take their ids (remove them, expand, then re-add "
            f"them)"
        )
    sp_after = spm.SentencePieceProcessor(model_proto=model_bytes)

    texts = sample.all_texts()
    identical, first = _compare(texts, sp_after.encode, _hf_encoder(hf), "sentencepiece", "AutoTokenizer")
    return ExpansionReport(
        kind="sentencepiece", source_dir="", target_dir="", vocab_before=vocab_before, vocab_after=len(proto.pieces),
        pieces_requested=len(pieces), pieces_added=len(appended.added),
        pieces_already_present=len(appended.already_present), duplicates=0,
        component_chars_added=len(appended.component_chars), bridge_pieces_added=len(appended.bridges),
        unreachable_pieces=appended.unreachable,
        chars_per_token=_compression(sample, sp_before.encode, sp_after.encode),
        check="agreement sentencepiece vs AutoTokenizer", check_identical=identical, check_total=len(texts),
        first_mismatch=first,
    )


def _sp_source_config(source_dir: Path, sp_size: int) -> tuple[dict, dict]:
    """``(tokenizer_config, special_tokens_map)`` for the target: copied from the source, else LLaMA defaults.

    Refuses sources whose added tokens sit after the SentencePiece ids: appending pieces would collide with them.
    """
    config = read_json(source_dir / "tokenizer_config.json", missing_ok=True) or {}
    special_map = read_json(source_dir / "special_tokens_map.json", missing_ok=True) or {}
    for path, token_id, content in _added_token_ids(source_dir, config):
        if token_id >= sp_size:
            raise UserInputError(
                f"{path}: added token {content!r} has id {token_id} beyond the {sp_size} SentencePiece pieces; "
                f"new pieces would take its id (remove it, expand, then re-add it)"
            )
    for key in ("tokenizer_file", "name_or_path", "auto_map"):
        config.pop(key, None)
    if config.get("add_prefix_space", "unset") is None:
        # save_pretrained writes "add_prefix_space": null; passed back, it makes the converted fast tokenizer
        # drop SentencePiece's leading "▁" and disagree with sentencepiece on every line.
        config.pop("add_prefix_space")
    config.setdefault("tokenizer_class", "LlamaTokenizer")
    config.setdefault("legacy", False)
    for key, default in LLAMA_SPECIAL_TOKENS.items():
        # save_pretrained writes special tokens as AddedToken dicts ({"content": ..., "lstrip": ...}).
        value = _token_content(special_map.get(key, config.get(key, default)))
        special_map[key] = value
        config[key] = value
    return config, special_map


def _added_token_ids(source_dir: Path, config: dict) -> list[tuple[Path, int, object]]:
    """``(file, id, content)`` of every added token a source records, in each of the three places transformers
    has kept them: ``tokenizer_config.json``'s ``added_tokens_decoder``, the older ``added_tokens.json``
    (``{content: id}``) and ``tokenizer.json``'s ``added_tokens``. A malformed entry is a one-line error."""
    found = []
    config_path = source_dir / "tokenizer_config.json"
    for token_id, token in _mapping(config.get("added_tokens_decoder") or {}, config_path, "added_tokens_decoder"):
        found.append((config_path, _token_id(token_id, config_path, "added_tokens_decoder"), _token_content(token)))
    added_path = source_dir / "added_tokens.json"
    for content, token_id in _mapping(read_json(added_path, missing_ok=True) or {}, added_path, None):
        found.append((added_path, _token_id(token_id, added_path, repr(content)), content))
    json_path = source_dir / "tokenizer.json"
    tokenizer_json = read_json(json_path, missing_ok=True)
    entries = tokenizer_json.get("added_tokens") if isinstance(tokenizer_json, dict) else None
    for entry in entries if isinstance(entries, list) else []:  # a damaged file fails loading, named there
        if isinstance(entry, dict) and "id" in entry:
            found.append((json_path, _token_id(entry["id"], json_path, "added_tokens"), entry.get("content")))
    return found


def _mapping(value, path: Path, field: Optional[str]):
    """``value.items()``, or a one-line error naming ``path`` when ``value`` is not a JSON object."""
    if not isinstance(value, dict):
        raise DataError(path, None, field, f"expected a JSON object, got {type(value).__name__}")
    return value.items()


def _token_id(value, path: Path, field: Optional[str]) -> int:
    """A token id read from a tokenizer file (an int, or a string of digits as JSON object keys are)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not (str(value).isascii() and str(value).isdigit()):
        raise DataError(path, None, field, f"token id {value!r} is not a non-negative integer")
    return int(value)


def _token_content(token) -> Optional[str]:
    """The text of a special token given as a string or as a serialised ``AddedToken`` dict."""
    return token.get("content") if isinstance(token, dict) else token


# ---------------------------------------------------------------- HF fast BPE


def _expand_bpe(source_dir, out_dir, pieces, sample: TextSample, add_component_chars) -> ExpansionReport:
    from tokenizers import AddedToken


    source = load_tokenizer(source_dir)
    if not source.is_fast:
        raise UserInputError(f"{source_dir}: expected a HF fast tokenizer (tokenizer.json), got {type(source).__name__}")
    vocab_before = len(source)
    covered = bpe_vocab_texts(source) | set(source.get_vocab())
    new = [p for p in pieces if p not in covered]
    expanded = load_tokenizer(source_dir)  # a second copy: ``source`` stays the "before" tokenizer
    expanded.add_tokens([AddedToken(p, special=False, normalized=False) for p in new])
    expanded.save_pretrained(str(out_dir))
    hf = load_tokenizer(out_dir)
    ids = hf.convert_tokens_to_ids(new)
    if len(hf) != vocab_before + len(new) or ids != list(range(vocab_before, vocab_before + len(new))):
        raise RuntimeError(f"added tokens did not get ids {vocab_before}.. in order (len {len(hf)})")

    texts = sample.all_texts()
    encode_after = _hf_encoder(hf)

    def roundtrip(batch):
        return [hf.decode(ids, clean_up_tokenization_spaces=False) for ids in encode_after(batch)]

    identical, first = _compare(texts, lambda batch: batch, roundtrip, "text", "decode(encode(text))")
    return ExpansionReport(
        kind="bpe", source_dir="", target_dir="", vocab_before=vocab_before, vocab_after=len(hf),
        pieces_requested=len(pieces), pieces_added=len(new), pieces_already_present=len(pieces) - len(new),
        duplicates=0, chars_per_token=_compression(sample, _hf_encoder(source), encode_after),
        check="round trip decode(encode(text)) with AutoTokenizer", check_identical=identical,
        check_total=len(texts), first_mismatch=first,
    )


# ---------------------------------------------------------------- shared helpers


def _hf_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _compression(sample: TextSample, encode_before, encode_after) -> dict[str, dict[str, float]]:
    return {
        lang: {"before": chars_per_token(sample.texts[lang], encode_before), "after": chars_per_token(sample.texts[lang], encode_after)}
        for lang in LANGUAGES
        if sample.texts[lang]
    }


def _compare(texts, encode_a, encode_b, name_a, name_b) -> tuple[int, Optional[str]]:
    """How many texts ``encode_a`` and ``encode_b`` map identically, and a description of the first that differ."""
    a, b = encode_a(texts), encode_b(texts)
    identical, first = 0, None
    for i, (text, x, y) in enumerate(zip(texts, a, b)):
        if x == y:
            identical += 1
        elif first is None:
            at = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            first = f"sample line {i + 1} {text[:60]!r}: from position {at} {name_a} {x[at:at + 6]} vs {name_b} {y[at:at + 6]}"
    return identical, first


# ---------------------------------------------------------------- CLI


@dataclass
class InitTokenizerConfig:
    """One expansion; its fields are the command line (each default written once, here)."""

    source_tokenizer_dir: Path = flag(help="SentencePiece or HF fast tokenizer folder")
    target_tokenizer_dir: Path = flag(help="where the expanded tokenizer is written")
    expand_tokens_file: Path = flag(help='jsonl lines {"piece": "你好"}; a marker \'▁\' (anywhere) or a leading \'Ġ\' '
                                         'is read as a space')
    overwrite: bool = flag(False, help="replace the tokenizer files of an existing target")
    report_corpus: List[Path] = flag([], help="jsonl ({source,target} or {text}) or plain text files; default: "
                                              "bundled real pretrain corpora")
    report_max_chars: int = flag(DEFAULT_REPORT_MAX_CHARS, help="characters sampled per language")
    allow_mismatch: bool = flag(False, help="keep the target even if the check finds differences")
    no_component_chars: bool = flag(False, help="SentencePiece: do not add missing single characters and bridge "
                                                "sub-words of new pieces (HF may then disagree, and some pieces may "
                                                "be unreachable)")
    report_json: Optional[Path] = flag(None, help="also write the report as JSON here (an existing file is replaced "
                                                  "only with --overwrite)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_flags(parser, InitTokenizerConfig)
    return parser


def parse_args(argv=None) -> InitTokenizerConfig:
    return config_from(build_parser().parse_args(argv), InitTokenizerConfig)


@cli_entry
def main(argv=None) -> int:
    cfg = parse_args(argv)
    if not cfg.source_tokenizer_dir.is_dir():
        raise UserInputError(f"{cfg.source_tokenizer_dir}: source tokenizer dir does not exist")
    if cfg.report_json:
        check_output_file(cfg.report_json, "--report_json", cfg.overwrite)
    pieces_file = read_pieces_file(cfg.expand_tokens_file)
    print(f"read {pieces_file.records} pieces from {pieces_file.path} ({pieces_file.duplicates} duplicates)")
    try:
        report = expand_tokenizer(
            cfg.source_tokenizer_dir, cfg.target_tokenizer_dir, pieces_file.pieces, cfg.overwrite,
            duplicates=pieces_file.duplicates, report_files=cfg.report_corpus or None, report_max_chars=cfg.report_max_chars,
            add_component_chars=not cfg.no_component_chars, allow_mismatch=cfg.allow_mismatch,
        )
    except TokenizerMismatchError as err:
        print(err.report.format())
        raise
    print(report.format())
    if cfg.report_json:
        cfg.report_json.parent.mkdir(parents=True, exist_ok=True)
        write_json(cfg.report_json, asdict(report))
    return 0


if __name__ == "__main__":
    main()

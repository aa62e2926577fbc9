"""Reading jsonl files (plain, ``.gz``, ``.zst``; their suffixes in any case) line by line, streaming, with exact
``file:line`` errors.

A damaged compressed file (cut short by an interrupted copy, or corrupt) is a one-line
:class:`~colossal_llama.utils.errors.UserInputError` naming the file, what is wrong and the last line that
was read whole, never a library traceback.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional, Tuple

from colossal_llama.utils.errors import DataError, UserInputError

log = logging.getLogger(__name__)

# Matched without regard to case (b.JSONL, c.Jsonl.GZ): names are lower-cased before they are compared.
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")
IGNORED_NAMES_SHOWN = 5  # names of ignored files a warning or an error lists (then how many more)
_READ_SIZE = 1 << 17  # small reads: a corrupt block costs few good lines
# Compressed bytes per zstd decompress call, whose output comes whole: a zstd block expands to at most 128 KiB from
# as little as 4 bytes (a run of one byte), so a call yields at most 65 blocks, about 8 MiB. A whole read of
# _READ_SIZE could expand to 4 GiB, far past MAX_LINE_BYTES, before the line could be measured.
_ZST_FEED = 1 << 8
# The longest line read (with its newline): memory per line is bounded, and a batch of lines stays far below
# Arrow's 2 GiB per buffer. A longer line is a located error (a counted skip under --skip_invalid), never read whole.
MAX_LINE_BYTES = 64 << 20
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors write at the start of a file


class CompressedInputError(UserInputError):
    """A ``.gz``/``.zst`` input that cannot be decompressed to its end."""

    def __init__(self, path: Path, problem: str, last_line: int):
        self.path, self.problem, self.last_line = Path(path), problem, last_line
        good = f"last good line: {last_line}" if last_line else "no line could be read"
        super().__init__(f"{path}: {problem}; {good}")


def _zst_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a ``.zst`` file (one or more frames), in chunks of about :data:`_READ_SIZE` (one
    :data:`_ZST_FEED` may expand to more: at most about 8 MiB). Unlike zstandard's ``stream_reader``, which silently
    stops at a cut, a file that ends inside a frame raises :class:`EOFError`."""
    with open(path, "rb") as fh:
        yield from _coalesced(_zst_outputs(fh), _READ_SIZE)


def _zst_outputs(fh: IO[bytes]) -> Iterator[bytes]:
    """What each :data:`_ZST_FEED` compressed bytes of ``fh`` decompress to (frames one after the other)."""
    import zstandard

    decoder, started = zstandard.ZstdDecompressor().decompressobj(), False
    while data := fh.read(_READ_SIZE):
        view, pos = memoryview(data), 0
        while pos < len(view):
            piece = view[pos:pos + _ZST_FEED]
            started, pos = True, pos + len(piece)
            out = decoder.decompress(piece)
            if decoder.eof:  # a frame ended inside this piece: the rest (if any) starts the next frame
                pos -= len(decoder.unused_data)
                decoder, started = zstandard.ZstdDecompressor().decompressobj(), False
            if out:
                yield out
            del out  # not held while the next piece is decompressed
    if started:
        raise EOFError("compressed data ends inside a frame")


def _coalesced(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """``chunks`` joined into chunks of about ``size`` bytes (fewer calls per line read); a chunk larger than
    ``size`` is passed on as it is, never copied."""
    held, total = [], 0
    for chunk in chunks:
        if held and total + len(chunk) > size:
            yield b"".join(held)
            held, total = [], 0
        held.append(chunk)
        total += len(chunk)
        del chunk  # held only in ``held`` while the next one is made
        if total >= size:
            yield held[0] if len(held) == 1 else b"".join(held)
            held, total = [], 0
    if held:
        yield b"".join(held)


class _ChunkStream(io.RawIOBase):
    """A readable stream of the byte chunks of a generator (so :func:`_bounded_lines` reads every format alike);
    an exception the generator raises (a cut or corrupt file) reaches the reader."""

    def __init__(self, chunks: Iterator[bytes]):
        super().__init__()
        self._chunks, self._chunk, self._pos = chunks, memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._chunks.close()  # the generator's own file, now rather than when it is collected
        super().close()

    def readinto(self, buffer) -> int:
        while self._pos == len(self._chunk):
            self._chunk = memoryview(b"")  # the spent chunk is let go before the next is made
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk, self._pos = memoryview(chunk), 0
        n = min(len(buffer), len(self._chunk) - self._pos)
        buffer[:n] = self._chunk[self._pos:self._pos + n]
        self._pos += n
        return n


class OverlongLine:
    """Stands for a line longer than ``limit`` bytes: its ``nbytes`` were read past, never held whole."""

    def __init__(self, nbytes: int, limit: int):
        self.nbytes, self.limit = nbytes, limit

    def __len__(self) -> int:
        return self.nbytes

    @property
    def problem(self) -> str:
        return f"line longer than {self.limit} bytes"


def _bounded_lines(fh: IO[bytes], max_bytes: int) -> Iterator[bytes | OverlongLine]:
    """Lines (with their ``\\n``; the last may lack it) of the binary stream ``fh``, each holding at most
    ``max_bytes`` in memory: a longer line is read past in small pieces and yielded as an :class:`OverlongLine`.
    (A ``.zst`` stream also holds one decompressed chunk: at most about 8 MiB, see :data:`_ZST_FEED`.)"""
    while line := fh.readline(max_bytes + 1):
        if len(line) <= max_bytes:
            yield line
            continue
        nbytes = len(line)
        while not line.endswith(b"\n") and (line := fh.readline(_READ_SIZE)):
            nbytes += len(line)
        yield OverlongLine(nbytes, max_bytes)


def is_jsonl_name(name: str) -> bool:
    """Whether a file called ``name`` is read as JSON lines: it ends in one of :data:`JSONL_SUFFIXES`, in any case."""
    return name.lower().endswith(JSONL_SUFFIXES)


def compression(path) -> Optional[str]:
    """``"gz"``, ``"zst"`` or None (plain), from the name's last suffix in any case (``a.JSONL.GZ`` is gzip)."""
    name = Path(path).name.lower()
    return "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else None


def _raw_lines(path: Path, max_bytes: int) -> Iterator[bytes | OverlongLine]:
    if compression(path) == "zst":
        with io.BufferedReader(_ChunkStream(_zst_chunks(path)), _READ_SIZE) as fh:
            yield from _bounded_lines(fh, max_bytes)
        return
    opener = gzip.open if compression(path) == "gz" else open
    with opener(path, "rb") as fh:
        yield from _bounded_lines(fh, max_bytes)


def _compression_problem(path: Path, err: Exception) -> str:
    kind = f".{compression(path) or 'gz'}"
    if isinstance(err, EOFError):
        return f"truncated {kind} file: the compressed data ends early"
    return f"corrupt {kind} file: {str(err).strip() or type(err).__name__}"


def iter_lines(path) -> Iterator[Tuple[int, bytes | OverlongLine]]:
    """``(line_number, raw bytes)`` of every line of ``path`` (1-based; blank lines included), streaming.

    A UTF-8 BOM that starts the file (what some editors write) is not part of line 1; a BOM anywhere else stays
    (JSON parsers refuse it). A line longer than :data:`MAX_LINE_BYTES` comes as an :class:`OverlongLine`.
    Raises :class:`CompressedInputError` when a compressed file is truncated or corrupt.
    """
    import zstandard

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    line_no = 0
    try:
        for line_no, raw in enumerate(_raw_lines(path, MAX_LINE_BYTES), start=1):
            if line_no == 1 and isinstance(raw, bytes) and raw.startswith(BOM):
                raw = raw[len(BOM):]
            yield line_no, raw
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as err:
        raise CompressedInputError(path, _compression_problem(path, err), line_no) from None


def open_text(path: Path) -> IO[str]:
    """Open a possibly compressed text file for strict UTF-8 reading (whole-file readers; no cut detection
    for ``.zst``: use :func:`iter_lines` for inputs)."""
    path = Path(path)
    if compression(path) == "gz":
        raw = gzip.open(path, "rb")
    elif compression(path) == "zst":
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    else:
        raw = open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="\n")


def iter_jsonl(path: Path) -> Iterator[Tuple[int, object]]:
    """Yield ``(line_number, parsed_value)`` for every non-blank line of ``path`` (1-based lines).

    Raises :class:`DataError` naming ``path:line`` for invalid JSON or invalid UTF-8, and
    :class:`CompressedInputError` for a truncated or corrupt compressed file.
    """
    for line_no, raw in iter_lines(path):
        if isinstance(raw, OverlongLine):
            raise DataError(path, line_no, None, raw.problem)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(path, line_no, None, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, line_no, None, f"invalid JSON ({err.msg}, column {err.colno})") from None


@dataclass
class FoundFiles:
    """What :func:`scan_jsonl_files` found: the files to read, in order, and every other file of the folders."""

    files: list = field(default_factory=list)  # JSON lines by name (:func:`is_jsonl_name`), each folder's sorted
    ignored: list = field(default_factory=list)  # the folders' other files, hidden ones aside (.DS_Store, .git/)


def scan_jsonl_files(input_dirs: list) -> FoundFiles:
    """The jsonl files under each of ``input_dirs`` (recursively, sorted; a file given itself is read whatever its
    name) and the folders' other files. Each folder's ignored files are a warning naming them: a file not read is
    never dropped in silence, except a hidden one (a name or a folder below the input starting with '.'). A folder
    without any jsonl file is an error (naming what it holds instead)."""
    found = FoundFiles()
    for d in input_dirs:
        d = Path(d)
        if d.is_file():
            found.files.append(d)
            continue
        if not d.is_dir():
            raise UserInputError(f"{d}: input directory does not exist")
        files, ignored = _folder_files(d)
        if not files:
            other = f"; {_ignored_names(d, ignored)}" if ignored else ""
            raise UserInputError(f"{d}: no jsonl files (looked for {', '.join(JSONL_SUFFIXES)}{other})")
        if ignored:
            log.warning("%s: %d file%s ignored, not JSON lines by name (%s): %s", d, len(ignored),
                        "" if len(ignored) == 1 else "s", ", ".join(JSONL_SUFFIXES), _names(d, ignored))
        found.files.extend(files)
        found.ignored.extend(ignored)
    return found


def _folder_files(folder: Path) -> tuple[list, list]:
    """``(jsonl files, other files not hidden)`` under ``folder``, recursively, each sorted. A hidden jsonl file is
    read, as it always was: only the report of what is not read leaves hidden files out."""
    files, ignored = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if is_jsonl_name(path.name):
            files.append(path)
        elif not any(part.startswith(".") for part in path.relative_to(folder).parts):
            ignored.append(path)
    return files, ignored


def _names(folder: Path, paths: list) -> str:
    shown = [str(p.relative_to(folder)) for p in paths[:IGNORED_NAMES_SHOWN]]
    more = len(paths) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _ignored_names(folder: Path, ignored: list) -> str:
    return f"{len(ignored)} other file{'' if len(ignored) == 1 else 's'} ignored: {_names(folder, ignored)}"


def not_utf8(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate from a JSON escape such as ``\\ud800``), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"a lone surrogate {text[err.start]!r} at character {err.start + 1} (not encodable as UTF-8)"
    return None

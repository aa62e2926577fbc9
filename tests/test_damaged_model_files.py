"""Damaged model files and killed runs, with real damage: a cut-off copy of the real SmolLM2 safetensors and
GGUF, a cut-off tokenizer.json, and ``init_model.py`` really killed with SIGKILL while it writes.

Every damaged file must give one line naming the file and what is wrong, never a library traceback; a killed
run's temporary folder must go away on the next run, and only when the process that made it is gone. What a
folder or JSON file publishes is on disk (out of the page cache) before its name appears: a machine that loses
power does not come back with a complete-looking model, manifest or checkpoint of empty files.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from colossal_llama.eval.cli import main as evaluate_main
from colossal_llama.inference.cli import main as generate_main
from colossal_llama.model.gguf_export import main as gguf_export_main
from colossal_llama.model.init_model import init_model_from_expanded_tokenizer
from colossal_llama.model.safetensors_stream import check_safetensors_file
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.durable import flush_filesystem
from colossal_llama.utils.json_files import write_json
from colossal_llama.utils.output import remove_stale_siblings, remove_stale_tmp_dirs, replace_dir

REPO = Path(__file__).resolve().parents[1]
DAMAGED = "truncated or corrupt safetensors file"


def run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The whole stderr of a failed command, which must be a single ``error: ...`` line (no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def copy_with(src: Path, dst: Path, replaced: dict) -> Path:
    """``dst``: the files of the model folder ``src`` (symlinked), except ``replaced`` {name: bytes}."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in replaced:
            (dst / f.name).write_bytes(replaced[f.name])
        else:
            (dst / f.name).symlink_to(f)
    return dst


# ---------------------------------------------------------------- check_safetensors_file


def test_check_safetensors_file_names_the_file_and_the_damage(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
              str(good), metadata={"format": "pt"})
    check_safetensors_file(good)  # what the safetensors library writes is accepted
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cases = {
        "cut.safetensors": (data[:-1], f"{len(data) - 1} bytes, the header describes {len(data)}: cut short"),
        "longer.safetensors": (data + b"\0", f"{len(data) + 1} bytes, the header describes {len(data)}: trailing bytes"),
        "tiny.safetensors": (data[:5], "5 bytes, shorter than the 8-byte header length"),
        "header_cut.safetensors": (data[: 8 + header_len // 2], f"header length {header_len}, file has"),
        "bad_json.safetensors": (data[:8] + b"#" + data[9:], "header is not JSON"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserInputError) as err:
            check_safetensors_file(path)
        assert str(err.value).startswith(f"{path}: {DAMAGED} (") and why in str(err.value), (name, str(err.value))
        with pytest.raises(Exception):  # the damage is real: the library refuses these files too
            with safe_open(str(path), framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]


@pytest.fixture(scope="module")
def cut_smollm2(smollm2_dir, tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct folder whose model.safetensors lost its last 4 KiB (a cut-off download)."""
    original = smollm2_dir / "model.safetensors"
    size = original.stat().st_size
    with open(original, "rb") as fh:
        head = fh.read(size - 4096)
    folder = copy_with(smollm2_dir, tmp_path_factory.mktemp("cut") / "smollm2", {"model.safetensors": head})
    damaged = folder / "model.safetensors"
    assert damaged.stat().st_size == size - 4096 and not damaged.is_symlink()
    with pytest.raises(SafetensorError):  # really damaged: the library itself refuses it (naming no file)
        safe_open(str(damaged), framework="pt")
    return folder


def test_cut_off_safetensors_source_of_init_model_is_one_line_naming_it(cut_smollm2, smollm2_dir, tmp_path):
    proc = run("colossal_llama/model/init_model.py", "--source_model_and_tokenizer_path", str(cut_smollm2),
               "--target_tokenizer_path", str(smollm2_dir), "--target_model_path", str(tmp_path / "model"))
    size = (smollm2_dir / "model.safetensors").stat().st_size
    assert one_line_error(proc) == (f"error: {cut_smollm2 / 'model.safetensors'}: {DAMAGED} "
                                    f"({size - 4096} bytes, the header describes {size}: cut short)")
    assert list(tmp_path.iterdir()) == [], "nothing is written, not even a temporary folder"


def in_process_error(main, argv, capsys) -> str:
    """Like :func:`one_line_error` for a CLI ``main`` called in this process (saves the imports of a child)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_cut_off_safetensors_model_given_to_generation_or_evaluation_is_one_line(cut_smollm2, tmp_path, capsys):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"target": "some text"}\n', encoding="utf-8")
    for main, argv in ((generate_main, ["--model_path", str(cut_smollm2), "--input_txt", "hi", "--device", "cpu"]),
                       (evaluate_main, ["bpc", "--model_path", str(cut_smollm2), "--data", str(held_out)])):
        line = in_process_error(main, argv, capsys)
        assert line.startswith(f"error: {cut_smollm2 / 'model.safetensors'}: {DAMAGED} ("), line


def test_cut_off_gguf_and_tokenizer_json_are_one_line_naming_them(smollm2_gguf_file, smollm2_dir, tmp_path, capsys):
    with open(smollm2_gguf_file, "rb") as fh:
        head = fh.read(1 << 20)
    for name, content, why in (("cut.gguf", head, "truncated or corrupt GGUF file ("),
                               ("stub.gguf", head[:3], "truncated or corrupt GGUF file (3 bytes)"),
                               ("renamed.gguf", (smollm2_dir / "config.json").read_bytes(), "not a GGUF file")):
        gguf = tmp_path / name
        gguf.write_bytes(content)
        line = in_process_error(gguf_export_main, ["--gguf_file", str(gguf), "--output_dir", str(tmp_path / f"out-{name}")],
                                capsys)
        assert line.startswith(f"error: {gguf}: {why}"), line
        assert not (tmp_path / f"out-{name}").exists()
    text = (smollm2_dir / "tokenizer.json").read_bytes()
    folder = copy_with(smollm2_dir, tmp_path / "cut_tokenizer", {"tokenizer.json": text[: len(text) // 2]})
    with pytest.raises(UserInputError, match=rf"^{folder / 'tokenizer.json'}: (invalid JSON|not valid UTF-8)"):
        load_tokenizer(folder)


def test_a_tokenizer_json_the_tokenizers_library_rejects_is_one_line_naming_it(smollm2_dir, tmp_path):
    tokenizer_json = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["model"]["type"] = "NoSuchModel"  # valid JSON, not a tokenizer
    folder = copy_with(smollm2_dir, tmp_path / "rejected", {"tokenizer.json": json.dumps(tokenizer_json).encode()})
    with pytest.raises(UserInputError, match=rf"^{folder / 'tokenizer.json'}: cannot load a tokenizer \(.+\)$"):
        load_tokenizer(folder)


@pytest.mark.parametrize("content, problem", [
    (b"[1, 2]", "weight_map: not a valid shard index"),
    (b'{"weight_map": {}}', "weight_map: not a valid shard index"),
    (b'{"weight_map": {"a": ["x"]}}', "weight_map: a: expected a shard file name, got ['x']"),
    (b'{"weight_map": {"a": 3}}', "weight_map: a: expected a shard file name, got 3"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"weight_map": {"a": "model-1', "invalid JSON"),
])
def test_a_damaged_shard_index_is_one_line_naming_it(tmp_path, content, problem):
    from colossal_llama.model.checkpoint_files import find_checkpoint

    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(UserInputError) as err:
        find_checkpoint(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'model.safetensors.index.json'}: {problem}"), str(err.value)


@pytest.mark.parametrize("damage", ["cut", "garbage", "empty", "not a state dict"])
def test_a_damaged_pytorch_bin_shard_is_one_line_naming_it(tmp_path, damage):
    from colossal_llama.model.checkpoint_files import find_checkpoint, open_shard

    shard = tmp_path / "pytorch_model.bin"
    torch.save({"model.embed_tokens.weight": torch.randn(64, 16)}, shard)
    whole = shard.read_bytes()
    if damage == "not a state dict":
        torch.save([torch.zeros(2)], shard)
    else:
        shard.write_bytes({"cut": whole[: len(whole) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(UserInputError, match=rf"^{shard}: truncated or corrupt PyTorch checkpoint file \(.+\)$"):
        open_shard(find_checkpoint(tmp_path), "pytorch_model.bin")


# ---------------------------------------------------------------- leftovers of killed runs


def test_kill_9_during_init_model_leaves_a_tmp_folder_that_the_next_run_removes(smollm2_dir, tmp_path):
    target = tmp_path / "model"
    child = subprocess.Popen(
        [sys.executable, "colossal_llama/model/init_model.py", "--source_model_and_tokenizer_path", str(smollm2_dir),
         "--target_tokenizer_path", str(smollm2_dir), "--target_model_path", str(target)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftover = tmp_path / f".model.tmp-init-{child.pid}"
    deadline = time.monotonic() + 240
    while not ((leftover / "model.safetensors").is_file() and (leftover / "model.safetensors").stat().st_size):
        assert child.poll() is None, "init_model finished before it could be killed mid-write"
        assert time.monotonic() < deadline, "init_model never started writing"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert leftover.is_dir() and not target.exists(), "a SIGKILL leaves the temporary folder behind"

    init_model_from_expanded_tokenizer(smollm2_dir, smollm2_dir, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "the next run removed the dead run's folder"
    check_safetensors_file(target / "model.safetensors")


def test_only_folders_of_processes_that_are_gone_are_removed(tmp_path):
    dead, me = dead_pid(), os.getpid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".model.tmp-init-{dead}", f".model.tmp-init-{alive.pid}", f".model.tmp-init-{me}",
                 f".model.tmp-init-{dead}x", ".model.tmp-init-abc", f".other.tmp-init-{dead}", "model"]
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "part.safetensors").write_bytes(b"partial")
        (tmp_path / f".model.tmp-init-{dead + 1000000}").write_text("a file, not a folder")
        (tmp_path / f".model.tmp-init-{dead + 1000001}").symlink_to(tmp_path / "model")

        assert remove_stale_siblings(tmp_path / "model", "tmp-init") == [tmp_path / f".model.tmp-init-{dead}"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            set(names) - {f".model.tmp-init-{dead}"} | {f".model.tmp-init-{dead + 1000000}",
                                                        f".model.tmp-init-{dead + 1000001}"})
        assert (tmp_path / "model" / "part.safetensors").is_file(), "a symlink's target is never touched"
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_tmp_dirs(tmp_path, ".model.tmp-init-{pid}") == [tmp_path / f".model.tmp-init-{alive.pid}"]
    assert remove_stale_tmp_dirs(tmp_path / "absent", ".x-{pid}") == []
    with pytest.raises(ValueError, match="has no {pid}"):
        remove_stale_tmp_dirs(tmp_path, ".tmp-epoch-*")


def test_pattern_wildcards_hosts_and_literal_names(tmp_path):
    dead, host = dead_pid(), socket.gethostname()
    here, elsewhere = f".tmp-epoch-1_step-8.{host}-{dead}", f".tmp-epoch-1_step-8.other-node-{dead}"
    for name in (here, elsewhere, f".a*b.tmp-init-{dead}", f".aXb.tmp-init-{dead}"):
        (tmp_path / name).mkdir()
    assert remove_stale_tmp_dirs(tmp_path, ".tmp-epoch-*.{host}-{pid}") == [tmp_path / here]
    assert (tmp_path / elsewhere).is_dir(), "a folder of another node (shared file system) is never removed"
    # a target name's own '*' is literal: only the sibling of 'a*b' goes
    assert remove_stale_siblings(tmp_path / "a*b", "tmp-init") == [tmp_path / f".a*b.tmp-init-{dead}"]
    assert (tmp_path / f".aXb.tmp-init-{dead}").is_dir()


def test_replace_dir_removes_the_old_copy_a_killed_run_left(tmp_path):
    dead = dead_pid()
    (tmp_path / f".model.old-{dead}").mkdir()  # killed between "rename the old model away" and "delete it"
    (tmp_path / "model").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text(json.dumps({"new": True}))
    replace_dir(tmp_path / "new", tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == {"new": True}


def test_replace_dir_refuses_a_file_or_a_link_as_target_and_leaves_no_junk(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "afile").write_text("the user's file")
    (tmp_path / "alink").symlink_to(tmp_path / "new")
    for target in (tmp_path / "afile", tmp_path / "alink"):
        with pytest.raises(UserInputError, match=f"^{target}: exists and is not a directory"):
            replace_dir(tmp_path / "new", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "alink", "new"]
    assert (tmp_path / "afile").read_text() == "the user's file"


# ---------------------------------------------------------------- on disk before published
def _dirty_mib() -> int:
    """The kernel's count of written, not yet flushed page-cache data (all filesystems), MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no Dirty: line in /proc/meminfo")


def _write_unflushed(path: Path, mib: int = 64) -> int:
    """Write ``mib`` MiB to ``path`` without fsync; returns the Dirty count after (skips where the filesystem keeps
    no dirty page cache, e.g. tmpfs)."""
    before = _dirty_mib()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(mib << 20))
    written = _dirty_mib()
    if written - before < mib // 2:
        pytest.skip(f"{path.parent}'s filesystem keeps no dirty page cache to flush (Dirty {before} -> {written} MiB)")
    return written


needs_meminfo = pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux's /proc/meminfo")


@needs_meminfo
def test_flush_filesystem_leaves_no_written_data_in_the_page_cache(tmp_path):
    """What each machine does for a checkpoint its ranks wrote to a shared filesystem (syncfs, not one fsync)."""
    written = _write_unflushed(tmp_path / "shard.bin")
    flush_filesystem(tmp_path)
    assert _dirty_mib() < written - 32, written
    with pytest.raises(FileNotFoundError):
        flush_filesystem(tmp_path / "missing")


@needs_meminfo
def test_a_replaced_folder_is_on_disk_before_its_name(tmp_path):
    (tmp_path / "model").mkdir()
    written = _write_unflushed(tmp_path / "new" / "deep" / "model.safetensors")
    replace_dir(tmp_path / "new", tmp_path / "model")
    assert _dirty_mib() < written - 32, written
    assert (tmp_path / "model" / "deep" / "model.safetensors").stat().st_size == 64 << 20


@needs_meminfo
def test_a_json_file_is_on_disk_before_its_name(tmp_path):
    """A manifest (or a checkpoint's running_states.json) is small, so a big value shows the flush."""
    _write_unflushed(tmp_path / "probe.bin")  # the filesystem does keep written data in the page cache
    flush_filesystem(tmp_path)
    before = _dirty_mib()
    write_json(tmp_path / "manifest.json", {"blob": "x" * (64 << 20)})
    assert _dirty_mib() < before + 32, before
    assert len(json.loads((tmp_path / "manifest.json").read_text())["blob"]) == 64 << 20


def _load_damaged_weights(ranks, folder):
    """On each rank: ``Checkpointer.load_weights`` of ``folder`` (whose weights file is cut short), counting the
    files this rank checked; the error it raised."""
    from colossal_llama.training import checkpoint_files
    from colossal_llama.training.checkpoint import Checkpointer

    checked, check = [], checkpoint_files.check_file
    checkpoint_files.check_file = lambda path: checked.append(path.name) or check(path)
    with pytest.raises(UserInputError) as err:
        Checkpointer.__new__(Checkpointer).load_weights(folder, flag="--pretrained")
    return checked, str(err.value)


def test_weights_are_checked_for_damage_by_rank_0_alone_and_every_rank_stops_with_its_line(cut_smollm2):
    """Every rank of a job loads the same --pretrained / stage weights; each checking every file read a 70 B
    model's 30-280 files 512 times over on one shared filesystem. Rank 0 checks them; a damaged one stops every
    rank with the same line naming it (none waits in a collective for the others)."""
    from tests.support.gloo_world import run_in_gloo_world

    (checked0, error0), (checked1, error1) = run_in_gloo_world(_load_damaged_weights, 2, cut_smollm2)
    assert "model.safetensors" in checked0 and checked1 == []
    assert error0 == error1 and error0.startswith(f"{cut_smollm2 / 'model.safetensors'}: {DAMAGED} (")

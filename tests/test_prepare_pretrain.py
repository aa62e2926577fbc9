"""Pre-training data preparation on the real corpora (a bounded slice of every file) and real tokenizers.

What must hold: every input token is an output token, in order per document (checked against an
independent SentencePiece tokenisation); masks cover exactly BOS+source; bins are per category; the
output is byte-identical for the same seed (also across num_proc 1 and 2) and reordered for another seed.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from colossal_llama.dataset.cli import pretrain_main
from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
from colossal_llama.dataset.manifest import Manifest
from colossal_llama.dataset.pipeline import PrepSummary, prepare_pretrain
from colossal_llama.dataset.prepared import load_manifest, load_part, part_dirs
from colossal_llama.utils.fingerprint import tokenizer_fingerprint
from colossal_llama.tokenizer.loading import load_tokenizer
from tests.support.prepared_data import reassemble, write_input_slice

MAX_LENGTH = 256
NUM_BINS = 4
SLICE = 1200  # rows per corpus file


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir) -> list[Path]:
    """Two input dirs holding the first rows of each real corpus, as plain, .gz and .zst jsonl."""
    root = tmp_path_factory.mktemp("pretrain_in")
    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()

    def head(name):
        with open(data_dir / "pretrain" / name, "rb") as fh:
            return b"".join(itertools.islice(fh, SLICE))

    with gzip.open(a / "news.jsonl.gz", "wb") as fh:
        fh.write(head("zh_news_peoples_daily_199801.jsonl"))
    (b / "reviews.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(head("zh_reviews.jsonl")))
    (b / "novel.jsonl").write_bytes(head("en_novel_botchan.jsonl"))  # whole file: 292 rows, last is empty
    return [a, b]


def _run(inputs, tokenizer_dir, out, **kw) -> PrepSummary:
    config = PretrainPrepConfig(input_dirs=inputs, tokenizer_dir=tokenizer_dir, output=OutputLayout.under(out),
                                max_length=kw.pop("max_length", MAX_LENGTH), num_bins=NUM_BINS, strict=False, **kw)
    return prepare_pretrain(config)


def _prepare(inputs, tokenizer_dir, out, **kw) -> Manifest:
    return _run(inputs, tokenizer_dir, out, **kw).manifest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, inputs, mistral_dir) -> Path:
    out = tmp_path_factory.mktemp("out") / "seed1_np1"
    assert _run(inputs, mistral_dir, out, seed=1, num_proc=1).tokenize_pids == [os.getpid()]  # no worker
    return out


def _source_rows(inputs) -> dict[str, dict]:
    """doc id ("file:line") -> original row, read independently of the library's reader."""
    rows = {}
    for path in sorted(p for d in inputs for p in d.iterdir()):
        if path.suffix == ".gz":
            text = gzip.decompress(path.read_bytes())
        elif path.suffix == ".zst":
            text = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
        else:
            text = path.read_bytes()
        for line_no, line in enumerate(text.decode("utf-8").split("\n"), start=1):
            if line.strip():
                rows[f"{path}:{line_no}"] = json.loads(line)
    return rows


def _chunk_starts_masked(labels: list[int], max_length: int) -> list[int]:
    """A document's labels as written: the first token of each chunk (a piece of its own in a row) is not trained."""
    return [-100 if i % max_length == 0 else label for i, label in enumerate(labels)]


def test_every_token_in_is_a_token_out_in_order(prepared, inputs, mistral_sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model))  # independent of HF tokenizers
    rows = _source_rows(inputs)
    docs, chunk_order = reassemble(prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    counts = manifest["counts"]

    skipped = [doc for doc, row in rows.items() if not row["target"].strip()]
    assert skipped == [f"{inputs[1] / 'novel.jsonl'}:292"]  # the real corpus's one row without text
    assert set(docs) == set(rows) - set(skipped)
    expected_tokens = 0
    for doc, (ids, labels) in docs.items():
        src, tgt = sp.encode(rows[doc]["source"]) if rows[doc]["source"] else [], sp.encode(rows[doc]["target"])
        assert ids == [sp.bos_id()] + src + tgt + [sp.eos_id()], doc
        assert labels == _chunk_starts_masked([-100] * (1 + len(src)) + tgt + [sp.eos_id()], MAX_LENGTH), doc
        assert chunk_order[doc] == list(range(len(chunk_order[doc]))), doc  # continuation stays in order
        expected_tokens += len(ids)

    assert counts["tokens_in"] == counts["tokens_out"] == expected_tokens
    assert counts["documents_in"] == len(docs) == 3 * SLICE - 1200 + 291
    assert counts["skipped"] == {"empty_text": 1}
    assert counts["split_documents"] == sum(1 for ids, _ in docs.values() if len(ids) > MAX_LENGTH) > 0
    # At max_length 256 most reviews/passages (median ~200 tokens) cannot share a sequence; at 4096 the
    # same corpora fill > 0.98 (benchmarks/prepare_throughput.py).
    assert counts["fill_ratio"] > 0.8
    print(f"\ntokens in {counts['tokens_in']} out {counts['tokens_out']} sequences {counts['sequences']} "
          f"fill {counts['fill_ratio']:.4f} split docs {counts['split_documents']}")


def test_output_follows_the_data_contract(prepared, mistral_dir):
    manifest = json.loads((prepared / "manifest.json").read_text())
    tok = load_tokenizer(mistral_dir)
    assert manifest["format_version"] == 2 and manifest["kind"] == "pretrain"
    assert (manifest["shard_index"], manifest["num_shards"], manifest["eval_parts"]) == (0, 1, [])
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert manifest["vocab_size"] == len(tok) == 32000
    assert (manifest["max_length"], manifest["num_bins"], manifest["seed"]) == (MAX_LENGTH, NUM_BINS, 1)
    assert manifest["chat_template"] is None
    parts = part_dirs(prepared / "arrow")
    assert [p.name for p in parts] == [e["name"] for e in manifest["parts"]] == [f"part-{k:05d}" for k in range(4)]
    for part, entry in zip(parts, manifest["parts"]):
        assert load_manifest(part).to_json() == manifest
        ds = load_part(part)
        assert {k: str(v) for k, v in ds.features.items()} == {
            "input_ids": "List(Value('int32'))", "labels": "List(Value('int32'))",
            "position_ids": "List(Value('int32'))", "category": "Value('string')"}
        lengths = [len(x) for x in ds["input_ids"]]
        assert all(1 <= n <= MAX_LENGTH for n in lengths)
        assert [len(x) for x in ds["labels"]] == lengths == [len(x) for x in ds["position_ids"]]
        per_cat = Counter(ds["category"])
        assert entry["num_sequences"] == len(ds) and entry["num_tokens"] == sum(lengths)
        assert {c: e["sequences"] for c, e in entry["per_category"].items()} == dict(per_cat)


def test_bins_are_per_category_and_even(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    per_category = defaultdict(list)
    for entry in manifest["parts"]:
        for cat in ("news", "review", "novel"):
            per_category[cat].append(entry["per_category"].get(cat, {"sequences": 0})["sequences"])
    for cat, sizes in per_category.items():
        assert max(sizes) - min(sizes) <= 1, (cat, sizes)
        assert min(sizes) > 0
    assert sum(sum(s) for s in per_category.values()) == manifest["counts"]["sequences"]
    assert manifest["counts"]["empty_bins"] == {} and manifest["counts"]["empty_parts"] == []


def _files(out: Path) -> dict[str, bytes]:
    files = [p for sub in ("arrow", "jsonl") for p in sorted((out / sub).rglob("*")) if p.is_file()]
    return {str(p.relative_to(out)): p.read_bytes() for p in files + [out / "manifest.json"]}


@pytest.mark.slow
def test_same_seed_is_byte_identical_also_with_two_processes(prepared, inputs, mistral_dir, tmp_path):
    pids = _run(inputs, mistral_dir, tmp_path / "seed1_np2", seed=1, num_proc=2).tokenize_pids
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes really tokenised
    first, second = _files(prepared), _files(tmp_path / "seed1_np2")
    assert first.keys() == second.keys() and len(first) > 10
    assert [k for k in first if first[k] != second[k]] == []


FEW_OPEN_FILES = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # soft and hard: the process may not raise it
from colossal_llama.dataset import records
records.BATCH_LINES = 16  # read 16 lines at a time, so that blocks can be small
from colossal_llama.dataset import token_cache
from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
from colossal_llama.dataset.pipeline import prepare_pretrain
token_cache.FIRST_BLOCK_BYTES = token_cache.RAW_BLOCK_BYTES = 8 << 10  # many small token files
caches, close = [], token_cache.TokenCache.close
def closing(self):
    caches.append({"token_files": len(self.paths), "capacity": self._open.capacity, "opened": self._open.opened})
    close(self)
token_cache.TokenCache.close = closing
inputs, tokenizer, out, max_length, num_bins = json.loads(sys.argv[1])
prepare_pretrain(PretrainPrepConfig(input_dirs=[Path(p) for p in inputs], tokenizer_dir=Path(tokenizer),
                                    output=OutputLayout.under(Path(out)), max_length=max_length, num_bins=num_bins,
                                    strict=False, seed=1, num_proc=1))
print(json.dumps(caches[-1]))
"""


def test_a_cache_of_more_token_files_than_a_process_may_open_is_read_with_a_bounded_pool(prepared, inputs,
                                                                                          mistral_dir, tmp_path):
    """100 B tokens make tens of thousands of token files; each held a descriptor until the parts were written, and
    a run past the limit of open files (ulimit -n, often 1024) failed with 'Too many open files' after hours of
    tokenising. Here: a limit of 64 (soft and hard) and 8 KiB blocks; the descriptors are a pool of what the limit
    allows (the least recently read closed first), and the parts equal those of a run with 4 MiB blocks."""
    import subprocess
    import sys

    out = tmp_path / "few_open_files"
    argv = json.dumps([[str(p) for p in inputs], str(mistral_dir), str(out), MAX_LENGTH, NUM_BINS])
    done = subprocess.run([sys.executable, "-c", FEW_OPEN_FILES, argv], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cache = json.loads(done.stdout.strip().splitlines()[-1])
    assert cache["token_files"] > 64 > cache["capacity"] and cache["opened"] > cache["token_files"], cache
    first, second = _files(prepared), _files(out)
    assert first.keys() == second.keys() and [k for k in first if first[k] != second[k]] == []


def test_other_seed_reorders_but_keeps_every_token(prepared, inputs, mistral_dir, tmp_path):
    other = _prepare(inputs, mistral_dir, tmp_path / "seed2", seed=2)
    base = json.loads((prepared / "manifest.json").read_text())
    assert other.counts.tokens_out == base["counts"]["tokens_out"]
    a, b = load_part(part_dirs(prepared / "arrow")[0]), load_part(part_dirs(tmp_path / "seed2" / "arrow")[0])
    assert a["input_ids"] != b["input_ids"]
    docs_a, _ = reassemble(prepared)
    docs_b, _ = reassemble(tmp_path / "seed2")
    assert docs_a == docs_b


def _novel_qa_input(data_dir, folder):
    """``folder/qa.jsonl``: 30 rows of real novel passages, each a passage as source and the next as target (long
    sources: chunks of them carry no trained token). Returns the 60 passages."""
    lines = (data_dir / "pretrain" / "en_novel_botchan.jsonl").read_text().splitlines()[:60]
    passages = [json.loads(line)["target"] for line in lines]
    folder.mkdir()
    with open(folder / "qa.jsonl", "w") as fh:
        for src, tgt in zip(passages[0::2], passages[1::2]):
            fh.write(json.dumps({"source": src, "target": tgt, "category": "novel"}) + "\n")
    return passages


def test_smollm2_tokenizer_and_fully_masked_pieces(tmp_path, smollm2_dir, data_dir):
    """Byte-level BPE tokenizer (BOS <|im_start|>, EOS <|im_end|>); long sources split into chunks whose
    labels are all masked are counted and still packed."""
    passages = _novel_qa_input(data_dir, tmp_path / "in")
    manifest = _prepare([tmp_path / "in"], smollm2_dir, tmp_path / "out", seed=3, max_length=64, num_proc=2)
    tok = load_tokenizer(smollm2_dir)
    docs, _ = reassemble(tmp_path / "out")
    masked_pieces = 0
    for line_no, (src, tgt) in enumerate(zip(passages[0::2], passages[1::2]), start=1):
        ids, labels = docs[f"{tmp_path / 'in' / 'qa.jsonl'}:{line_no}"]
        s, t = tok.encode(src, add_special_tokens=False), tok.encode(tgt, add_special_tokens=False)
        assert ids == [tok.bos_token_id] + s + t + [tok.eos_token_id]
        assert labels == _chunk_starts_masked([-100] * (1 + len(s)) + t + [tok.eos_token_id], 64)
        masked_pieces += (1 + len(s)) // 64  # whole 64-token chunks inside BOS+source
    counts = manifest.counts
    assert counts.fully_masked_samples == masked_pieces > 0
    assert counts.tokens_in == counts.tokens_out
    assert manifest.vocab_size == 49152


def test_fully_masked_pieces_of_the_held_out_split_are_counted(tmp_path, smollm2_dir, data_dir):
    """``fully_masked_samples`` counts every written piece without a trained token: those of the training parts and
    those of the held-out split (``--holdout_fraction``) alike, as ``tokens_out`` counts the tokens of both."""
    _novel_qa_input(data_dir, tmp_path / "in")
    counts = _run([tmp_path / "in"], smollm2_dir, tmp_path / "out", seed=3, max_length=64,
                  holdout_fraction=0.5).counts

    def masked_pieces(split):
        """Pieces (chunks of 64 tokens, each its own piece) of the split's documents whose labels are all -100."""
        docs, _ = reassemble(tmp_path / "out", split)
        return sum(all(label == -100 for label in labels[i: i + 64])
                   for _, labels in docs.values() for i in range(0, len(labels), 64))

    train, held = masked_pieces("train"), masked_pieces("eval")
    assert train > 0 and held > 0
    assert counts.fully_masked_samples == train + held


def test_cli_with_older_output_flags(tmp_path, inputs, mistral_dir, capsys):
    c, j, a = tmp_path / "c", tmp_path / "prep" / "jsonl", tmp_path / "prep" / "arrow"
    argv = ["--data_input_dirs", f"{inputs[1]}", "--tokenizer_dir", str(mistral_dir), "--data_cache_dir", str(c),
            "--data_jsonl_output_dir", str(j), "--data_arrow_output_dir", str(a), "--max_length", "512",
            "--num_spliced_dataset_bins", "2", "--skip_invalid"]
    assert pretrain_main(argv) == 0
    manifest = load_manifest(part_dirs(a)[0])
    assert (tmp_path / "prep" / "manifest.json").is_file()
    assert c.is_dir() and not any(c.iterdir())  # the token cache lives only while the run does
    tok = load_tokenizer(mistral_dir)
    mirror = [json.loads(line) for line in (j / "part-00000.jsonl").read_text(encoding="utf-8").splitlines()]
    assert "text" not in mirror[0] and mirror[0]["pieces"][0]["doc"].startswith(str(inputs[1]))
    assert len(manifest.parts) == 2 and manifest.counts.skipped == {"empty_text": 1}
    with pytest.raises(SystemExit) as exc:  # a second run must not silently mix with the first
        pretrain_main(argv)
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()
    manifest_path = tmp_path / "prep" / "manifest.json"
    assert err[-1] == f"error: {manifest_path}: output already exists (pass --overwrite to replace it)"
    assert "Traceback" not in stderr and sum(line.startswith("error") for line in err) == 1
    assert pretrain_main(argv + ["--overwrite", "--seed", "5", "--mirror_text"]) == 0
    assert load_manifest(part_dirs(a)[0]).seed == 5
    rows = load_part(part_dirs(a)[0])["input_ids"]
    mirror = [json.loads(line) for line in (j / "part-00000.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["text"] for m in mirror] == [tok.decode(ids) for ids in rows]  # --mirror_text: the decoded rows


def _cli_error(argv, capsys) -> str:
    """The one error line of a CLI run that must fail."""
    with pytest.raises(SystemExit) as exc:
        pretrain_main(argv)
    stderr = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in stderr
    return stderr.strip().splitlines()[-1]


def test_the_older_flags_claim_and_delete_only_what_they_wrote(tmp_path, inputs, mistral_dir, capsys, monkeypatch):
    """``--data_arrow_output_dir arrow_output`` puts manifest.json in its parent, here the working directory: an
    unrelated ./eval/ there was "incomplete output of an earlier run" and --overwrite deleted it, without any
    --holdout_fraction. Now eval/ is ours only when a run holds data out or our manifest names it; a folder holding
    what this tool does not write, or a manifest.json not ours, is refused even with --overwrite, untouched."""
    from colossal_llama.training.data import collect_parts, expand_dataset_args

    work = tmp_path / "work"
    notes = work / "eval" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    monkeypatch.chdir(work)
    argv = ["--data_input_dirs", f"{inputs[1]}", "--tokenizer_dir", str(mistral_dir), "--data_cache_dir", "cache",
            "--data_jsonl_output_dir", "jsonl_output", "--data_arrow_output_dir", "arrow_output", "--max_length",
            "512", "--num_spliced_dataset_bins", "2", "--skip_invalid"]
    assert pretrain_main(argv) == 0 and pretrain_main(argv + ["--overwrite"]) == 0
    assert notes.read_text() == "mine"
    parts, manifests = collect_parts(expand_dataset_args([str(work / "arrow_output")]))  # training finds it
    assert list(manifests) == [work / "manifest.json"] and len(parts) == 2
    assert _cli_error(argv + ["--overwrite", "--holdout_fraction", "0.1"], capsys) == (
        "error: eval: holds notes.txt, which this tool did not write, so it is not an output of this tool to "
        "replace; remove it or choose another output folder")
    (work / "manifest.json").write_text('{"name": "my project"}')
    assert _cli_error(argv + ["--overwrite"], capsys) == (
        "error: manifest.json: not a manifest written by this tool (format_version: None (this version reads "
        "1, 2)); remove it or choose another output folder")
    assert notes.read_text() == "mine" and (work / "manifest.json").read_text() == '{"name": "my project"}'


def test_an_output_of_the_previous_format_still_reads(prepared, tmp_path):
    """format_version 1 manifests (before shards, the held-out split and SFT packing) read with their defaults;
    an unknown version is a one-line error."""
    from colossal_llama.training.data import collect_parts, expand_dataset_args
    from colossal_llama.utils.errors import UserInputError

    old = json.loads((prepared / "manifest.json").read_text())
    for key in ("shard_index", "num_shards", "holdout_fraction", "eval_dir", "eval_parts", "packing"):
        del old[key]
    old["format_version"] = 1
    shutil.copytree(prepared / "arrow", tmp_path / "arrow")
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    parts, manifests = collect_parts(expand_dataset_args([str(tmp_path)]))
    manifest = manifests[tmp_path / "manifest.json"]
    assert (manifest.num_shards, manifest.eval_parts, manifest.packing, len(parts)) == (1, [], True, NUM_BINS)
    assert manifest.counts.tokens_out == old["counts"]["tokens_out"]
    (tmp_path / "manifest.json").write_text(json.dumps({**old, "format_version": 3}))
    with pytest.raises(UserInputError, match=r"manifest.json: format_version: 3 \(this version reads 1, 2\)$"):
        collect_parts(expand_dataset_args([str(tmp_path)]))


def test_no_token_is_trained_across_documents_and_trained_counts_what_the_loss_sees(tmp_path, smollm2_dir, data_dir):
    """A tokenizer without BOS (Qwen's, a base model's): the first token of a document packed after another one
    had its label, so the previous document's last token (which, under the block mask, sees only its own
    document) was trained to predict it; and every chunk's first label was counted in ``tokens_trained`` although
    the shifted loss never sees it. Now each piece's first label is -100 and ``tokens_trained`` is exactly what
    the loss counts (``labels[1:] != -100`` per row)."""
    tok = load_tokenizer(smollm2_dir)
    tok.bos_token = None
    tok.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").bos_token_id is None
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "novel.jsonl").write_bytes(
        b"".join((data_dir / "pretrain" / "en_novel_botchan.jsonl").read_bytes().splitlines(keepends=True)[:120]))
    manifest = _prepare([tmp_path / "in"], tmp_path / "tok", tmp_path / "out", seed=3, max_length=1024)
    loss_tokens, pieces_after_another = 0, 0
    for part in part_dirs(tmp_path / "out" / "arrow"):
        for row in load_part(part):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
            assert all(row["labels"][i] == -100 for i in starts)
            pieces_after_another += len(starts) - 1
            loss_tokens += sum(label != -100 for label in row["labels"][1:])
    assert pieces_after_another > 50  # many documents really share rows
    assert manifest.counts.tokens_trained == loss_tokens


def test_special_tokens_spelled_in_a_document_are_text(tmp_path, mistral_dir, mistral_sp_model):
    """Web text holds ``<s>...</s>`` (HTML's strikethrough) and ``</s>``: read as the tokenizer's BOS and EOS, they
    put control tokens in the middle of documents (the model learns to end a document at a strikethrough). A
    document's ids are its text's, as SentencePiece itself encodes it; BOS and EOS only where the pipeline puts
    them."""
    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model))
    target = "Prices were <s>$10</s> $8 today.</s> Next: <unk> and [INST] stay text too."
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "web.jsonl").write_text(json.dumps({"source": "", "target": target, "category": "web"}) + "\n")
    _prepare([tmp_path / "in"], mistral_dir, tmp_path / "out", seed=1, max_length=256)
    docs, _ = reassemble(tmp_path / "out")
    (ids, labels), = docs.values()
    assert ids == [sp.bos_id()] + sp.encode(target) + [sp.eos_id()]
    assert ids.count(sp.eos_id()) == 1 and ids.count(sp.bos_id()) == 1


def _prepared_state(out: Path):
    """What a trainer gets from ``out``: its training and held-out rows (input_ids, sorted), or the error line."""
    from colossal_llama.training.data import collect_parts, expand_dataset_args, load_prepared
    from colossal_llama.utils.errors import UserInputError

    def rows(split):
        data = load_prepared(*collect_parts(expand_dataset_args([str(out)], split)))
        return tuple(sorted(map(tuple, data.dataset["input_ids"])))

    try:
        train = rows("train")
        return train, rows("eval") if Manifest.read(out / "manifest.json").eval_dir else None
    except UserInputError as err:
        return str(err)


def _shape(out: Path) -> frozenset:
    """The entries of ``out`` two levels down (not inside hidden folders; process ids left out)."""
    names = set()
    for entry in out.iterdir():
        names.add(re.sub(r"\d+$", "", entry.name))
        if entry.is_dir() and not entry.name.startswith("."):
            names.update(f"{entry.name}/{child.name}" for child in entry.iterdir())
    return frozenset(names)


def _killed_while_publishing(kill_at: int, prepare) -> int:
    """``prepare()`` in a forked child killed (``os._exit``: no cleanup, as SIGKILL) just before its ``kill_at``-th
    rename, replace, unlink or rmdir once publishing began; its exit code (0: it finished first)."""
    from colossal_llama.dataset.pipeline import OutputRun

    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:
        ops = itertools.count(1)

        def dying(op):
            return lambda *args, **kw: os._exit(137) if next(ops) == kill_at else op(*args, **kw)

        publish = OutputRun.publish

        def armed(self, manifest):
            for name in ("rename", "replace", "unlink", "rmdir"):
                setattr(os, name, dying(getattr(os, name)))
            publish(self, manifest)

        OutputRun.publish = armed
        prepare()
        code = 0
    finally:
        os._exit(code)


def test_a_kill_while_publishing_leaves_the_old_output_the_new_or_a_refusal(tmp_path, data_dir, mistral_dir):
    """The parts, the jsonl mirror, the held-out split and manifest.json cannot be swapped in at once. After a kill
    at any step of publishing, a trainer gets the old output whole, the new one whole, or a one-line error; the
    same command again refuses in one line without --overwrite and with it writes the new output, nothing of the
    old one left (an old held-out split stayed beside a new output that has none)."""
    from colossal_llama.utils.errors import UserInputError

    inputs = [write_input_slice(data_dir, tmp_path / "in", {"en_novel_botchan.jsonl": 40, "zh_reviews.jsonl": 60})]
    old_kw, new_kw = dict(seed=1, holdout_fraction=0.2), dict(seed=2, max_length=128)
    template, clean = tmp_path / "template", tmp_path / "clean"
    _run(inputs, mistral_dir, template, **old_kw)
    _run(inputs, mistral_dir, clean, **new_kw)
    old, new = _prepared_state(template), _prepared_state(clean)
    assert isinstance(old, tuple) and isinstance(new, tuple) and old != new
    refused, reran = 0, set()
    for kill_at in itertools.count(1):
        out = tmp_path / f"kill-{kill_at}"
        shutil.copytree(template, out)
        code = _killed_while_publishing(kill_at, lambda: _run(inputs, mistral_dir, out, overwrite=True, **new_kw))
        if code == 0:
            break
        assert code == 137
        state = _prepared_state(out)
        if state in (old, new):
            continue
        missing = (rf"(--dataset )?{re.escape(str(out))}/manifest.json: manifest missing \(data preparation did not "
                   r"finish: prepare it again, with --overwrite; or the path is not OUT/arrow/part-\*\)")
        assert re.fullmatch(missing, state), (kill_at, state)
        refused += 1
        if _shape(out) in reran:
            continue  # the rerun of a folder like this one was checked (a kill amid a hidden folder's removal)
        reran.add(_shape(out))
        with pytest.raises(UserInputError, match="pass --overwrite") as err:
            _run(inputs, mistral_dir, out, **new_kw)
        assert "\n" not in str(err.value)
        _run(inputs, mistral_dir, out, overwrite=True, **new_kw)
        assert _prepared_state(out) == new, kill_at
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir()), kill_at
    assert kill_at > 30 and refused > 20 and len(reran) > 3, (kill_at, refused, reran)  # every step a kill point

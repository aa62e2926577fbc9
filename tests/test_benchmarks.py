"""The benchmark scripts run end to end on CPU (their GPU figures are only as good as this path)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_throughput_prints_a_row_per_plugin_with_measured_tokens_per_s(tmp_path, data_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    news = (data_dir / "pretrain" / "zh_news_peoples_daily_199801.jsonl").read_text(encoding="utf-8").splitlines()
    (corpus / "news.jsonl").write_text("\n".join(news[:400]) + "\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--shape", "tiny", "--seq_len", "128",
         "--micro_batch_size", "2", "--runs", "ddp", "zero2", "3d", "gemini", "--steps", "4", "--skip_steps", "1",
         "--corpus", str(corpus)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {m.group(1): m for m in re.finditer(
        r"^\| (\w+) \| sdpa \| off \| 2 x 1 \| ([\d,]+) \| [\d.]+% \| n/a \(CPU\) \| (\d+) \| \d+ \| ok \|$", out.stdout, re.M)}
    assert set(rows) == {"ddp", "zero2", "3d"}, out.stdout
    for plugin, row in rows.items():
        assert int(row.group(3)) == 3, plugin  # steps 2..4 measured
        assert int(row.group(2).replace(",", "")) > 0, plugin
    assert "| gemini | - | - | 2 x 1 | - | - | - | 0 | - | skipped: gemini needs CUDA" in out.stdout


def test_eval_memory_benchmark_finds_the_chunked_scoring_exact_and_the_full_logits_close(smollm2_dir):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_memory.py"), "--model_path",
                          str(smollm2_dir), "--shapes", "2x128"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| 2 x 128 \| (full logits|scored positions, chunked) \| [\d,]+ MB \| [\d.]+ \| ([\d,.]+) \| "
                      r"([-+][\d.]+e[-+]\d+) \|", out.stdout, re.M)
    assert [way for way, _, _ in rows] == ["full logits", "scored positions, chunked"], out.stdout
    (_, full, full_error), (_, chunked, chunked_error) = rows
    assert float(full.replace(",", "")) > 100 and abs(float(chunked_error)) < 1e-6  # the current way is exact
    assert abs(float(full_error)) < 1e-4


def test_generation_batch_benchmark_times_each_batch_size_with_the_same_replies(smollm2_dir):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generation_batch.py"), "--model_path",
                          str(smollm2_dir), "--prompts", "4", "--batch_sizes", "1,4", "--max_new_tokens", "8"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| [\d.]+ \| [\d,.]+ \| ([\d.]+)x \| (\d+) of 4 \|$", out.stdout, re.M)
    assert [(size, same) for size, _, same in rows] == [("1", "4"), ("4", "4")], out.stdout
    assert rows[0][1] == "1.00"


def test_eval_scale_benchmark_cuts_the_same_windows_both_ways_and_streams_in_less_memory():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_scale.py"), "--copies", "1",
                          "--chunk_tokens", "65536"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "!!" not in out.stdout, out.stdout  # the two ways cut the same windows
    rows = {m.group(2): m for m in re.finditer(
        r"^\| 1x \(\d+ MB\) \| ([\d,]+) \| (whole file|streamed) \| ([\d,]+) MB \| [\d.]+ \| ([\d,]+) \| ([\d.]+)x \|$",
        out.stdout, re.M)}
    assert set(rows) == {"whole file", "streamed"}, out.stdout
    assert rows["whole file"].group(1) == rows["streamed"].group(1) != "0"  # the same tokens
    assert float(rows["streamed"].group(5)) < 0.5  # a 64k-token chunk against every window of the file as lists


def test_eval_tokenise_ranks_benchmark_splits_the_texts_and_cuts_the_same_chunks():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_tokenise_ranks.py"), "--processes", "2",
                          "--max_lines", "3000", "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "!!" not in out.stdout, out.stdout  # the same chunks both ways, in every process
    row = re.search(r"^\| 2 \| ([\d,]+) \| [\d.]+ -> [\d.]+ \| [\d.]+x \| [\d.]+ -> [\d.]+ \| [\d.]+x \| "
                    r"3,000 -> 1,536/1,464 \|$", out.stdout, re.M)
    assert row and int(row.group(1).replace(",", "")) > 100_000, out.stdout


def test_train_loss_memory_benchmark_gives_the_same_loss_both_ways(smollm2_dir):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_loss_memory.py"), "--model_path",
                          str(smollm2_dir), "--shapes", "1x256", "--vocabs", "49152"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| 49,152 \| 1 x 256 \| (full logits|scored positions, 1,365 a call) \| [\d,]+ MB \| "
                      r"[\d.]+ \| "
                      r"([\d.]+) \| [\d.]+x \| [\d.]+x \|$", out.stdout, re.M)
    assert [way for way, _ in rows] == ["full logits", "scored positions, 1,365 a call"], out.stdout
    assert abs(float(rows[0][1]) - float(rows[1][1])) < 1e-5 and float(rows[0][1]) < 6  # a real model on real text


def test_sft_templates_benchmark_prepares_the_same_conversations_with_each_template(smollm2_dir):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sft_templates.py"), "--smollm2_dir",
                          str(smollm2_dir), "--copies", "1", "--repeats", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^(llama2|llama3|tokenizer) +([\d,]+) +([\d,]+) +[\d.]+ +[\d,]+ +([\d.]+)x$", out.stdout, re.M)
    assert [name for name, *_ in rows] == ["llama2", "llama3", "tokenizer"], out.stdout
    assert len({conversations for _, conversations, _, _ in rows}) == 1 and rows[0][1] != "0"  # the same rows
    assert rows[1][3] == "1.00" and all(int(tokens.replace(",", "")) > 0 for _, _, tokens, _ in rows)


def test_plan_memory_benchmark_prints_bytes_per_document_for_each_size():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plan_memory.py"), "--documents", "20000", "80000"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| ([\d,]+) \| ([\d,]+) \| \d+ MB \((\d+)\) \| \d+ MB \((\d+)\) \| ([\d,]+) \|", out.stdout, re.M)
    assert [r[0] for r in rows] == ["20,000", "80,000"], out.stdout
    for documents, tokens, _table, _peak, pieces in rows:
        assert int(pieces.replace(",", "")) >= int(documents.replace(",", ""))  # a piece per document at least



def test_category_setup_benchmark_times_every_stage_for_each_category_count():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "category_setup.py"), "--rows", "20000",
                          "--categories", "3", "300"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$",
                      out.stdout, re.M)
    assert [r[0] for r in rows] == ["3", "300"] and rows[0][-1] == "1.0", out.stdout

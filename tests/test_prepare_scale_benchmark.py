"""The scale benchmark runs end to end on CPU and its table holds what it claims (on a slice of the real corpora)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.prepared_data import write_input_slice

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_prepare_scale_prints_a_row_per_size_and_for_two_shards(tmp_path, data_dir):
    corpus = write_input_slice(data_dir, tmp_path / "corpus", {"en_novel_botchan.jsonl": 100, "zh_reviews.jsonl": 200})
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prepare_scale.py"), "--sizes", "1",
                          "--repeat", "2", "--shard_size", "2", "--corpus", str(corpus), "--num_bins", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "every file copied 1x, 2x: a real corpus made bigger" in out.stdout
    rows = {m.group(1): m for m in re.finditer(
        r"^\| (1x|2x, 2 shards) \| (\d) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) MB \(([\d.]+)x\) \| ([\d.]+) \| ([\d,]+) \|",
        out.stdout, re.M)}
    assert set(rows) == {"1x", "2x, 2 shards"}, out.stdout
    tokens = {k: int(m.group(3).replace(",", "")) for k, m in rows.items()}
    assert tokens["2x, 2 shards"] == 2 * tokens["1x"] > 0  # the two shards of the doubled corpus hold all of it
    assert rows["2x, 2 shards"].group(2) == "2" and float(rows["2x, 2 shards"].group(6)) > 1.5  # two processes
    assert re.search(r"^\| bare fast tokenizer, 1x texts \(fastest\) \| 1 \| [\d,]+ \|", out.stdout, re.M)
    assert "single-process sizes: the median of 2 runs" in out.stdout  # --repeat: shared machines are noisy
    assert re.search(r"^\| 1x \| 1 \|.* \| \d+ % \(\d+-\d+ %\) \|", out.stdout, re.M), out.stdout
    assert re.search(r"^\| 2x, 2 shards \| 2 \|.* \| \d+ % \|", out.stdout, re.M), out.stdout

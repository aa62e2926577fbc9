"""benchmarks/vocab_expansion.py (the README's vocabulary table) runs end to end, here on the bundled slice with
small sizes: the corpus-mined row hits its vocabulary exactly, needs no bridge pieces, agrees with sentencepiece
on every held-out row and encodes held-out Chinese in fewer tokens than the base."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<name>[^|]+) \| (?P<vocab>[\d,]+) \| (?P<added>[^|]+) \| (?P<zh>[\d.]+) \| (?P<per_sample>[\d.]+) \| "
                 r"(?P<en>[\d.]+) \| (?P<agree>[^|]+) \| \d+ \|$", re.M)


def test_vocab_table_on_the_bundled_slice(mistral_sp_model):
    bundled = REPO / "examples" / "data"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vocab_expansion.py"), "--data_dir", str(bundled),
         "--held_out", "300", "--target_vocab", "37000", "--mine_vocab_size", "9000", "--jieba_words", "2000"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held out: 600 Chinese rows, 63 English passages" in proc.stdout
    base, mined, jieba = [m.groupdict() for m in ROW.finditer(proc.stdout)]
    assert base["vocab"] == "32,000" and base["added"].strip() == "-"
    assert mined["name"].startswith("corpus-mined") and mined["vocab"] == "37,000"
    pieces, chars, bridges = (int(x.replace(",", "")) for x in mined["added"].split(" + "))
    assert pieces + chars + bridges == 5000 and bridges == 0
    for row in (mined, jieba):
        identical, total = row["agree"].strip().split("/")
        assert identical == total and int(total) >= 600
        assert float(row["zh"]) < float(base["zh"]) and float(row["per_sample"]) < float(base["per_sample"])
        assert float(row["en"]) <= float(base["en"])

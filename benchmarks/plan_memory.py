"""Host memory of data preparation per document: the document table (with the token cache's offsets), and its
peak while packing is planned.

Tokens stay on disk (the token cache); what grows with a corpus is the per-document metadata (``DocTable``) and
the plan built from it (pieces, sequences, bins). Each size runs in a process of its own (``ru_maxrss`` is a
process's peak), on a synthetic table of log-normal document lengths (median about 400 tokens, mean about 650,
clipped to 2-50,000), three categories, ``--max_length 4096`` and 10 bins: nothing is tokenised or written.

    python benchmarks/plan_memory.py --documents 1000000 4000000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(documents: int) -> dict:
    """In this process: the table's and the planning's growth of the peak resident memory."""
    import numpy as np

    from colossal_llama.dataset import pipeline
    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.token_cache import DocTable

    base = _peak_mb()
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6, 1, documents), 2, 50_000).astype(np.int32)
    zeros = np.zeros(documents, np.int32)
    docs = DocTable(category=rng.integers(0, 3, documents).astype(np.int32), file=zeros.copy(),
                    line=np.arange(1, documents + 1, dtype=np.int64), length=lengths, full_length=lengths.copy(),
                    trained_from=np.ones(documents, np.int32), exchanges=zeros.copy(), exchanges_kept=zeros.copy(),
                    categories=["a", "b", "c"], files=[])
    value_offset = np.cumsum(lengths, dtype=np.int64)  # the token cache's own per-document array (its tokens' place)
    table = _peak_mb() - base
    config = PretrainPrepConfig(input_dirs=[Path("unused")], tokenizer_dir=Path("unused"),
                                output=OutputLayout.under(Path("unused")), max_length=4096, num_bins=10)
    started = time.perf_counter()
    train, _, _ = pipeline._plans(docs, config)  # what prepare_pretrain plans between tokenising and writing
    seconds = time.perf_counter() - started
    del value_offset
    return {"documents": documents, "tokens": int(lengths.sum()), "table_mb": table, "peak_mb": _peak_mb() - base,
            "pieces": len(train.sequences.doc), "plan_s": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return 0
    print("| documents | tokens | table (B/doc) | peak while planning (B/doc) | pieces | plan s | docs/s |")
    print("|---|---|---|---|---|---|---|")
    for documents in args.documents:
        child = subprocess.run([sys.executable, __file__, "--one", str(documents)], cwd=REPO, capture_output=True,
                               text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        per_doc = 2**20 / r["documents"]
        print(f"| {r['documents']:,} | {r['tokens']:,} | {r['table_mb']:.0f} MB ({r['table_mb'] * per_doc:.0f}) | "
              f"{r['peak_mb']:.0f} MB ({r['peak_mb'] * per_doc:.0f}) | {r['pieces']:,} | {r['plan_s']:.1f} | "
              f"{r['documents'] / r['plan_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())

"""Fill the device carries for ``scripts/gpu_check.sh --pack``: the wheel kit, the full corpora and the SmolLM2 GGUF,
spread over ``--calls`` folders ``OUT/1 .. OUT/N`` that each travel in one device call.

A device call carries the tracked files plus the paths it names, at most 64 MiB in all; the payload (about 163 MiB)
needs three calls. Whole files (wheels, corpora) go first, largest first, each to the least loaded folder; the GGUF,
which can be cut anywhere, then tops every folder up to the same load, in numbered parts (``.part-0`` ..) that
``gpu_check.sh`` joins in that order and checks against the ``.md5`` beside part 0. A folder holds ``kit/`` (wheels)
and ``data/`` (laid out as the data root: ``models/``, ``pretrain/``).

    python scripts/gpu_pack.py --shared ../shared --out .gpucarry [--calls 3]
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
CALL_LIMIT = 64 << 20  # bytes a device call may carry, tracked files included
MARGIN = 1 << 20  # left free in every call: untracked files that git does not ignore travel too
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPORA = ("zh_news_peoples_daily_199801.jsonl", "zh_reviews.jsonl", "en_novel_botchan.jsonl")
MIB = 1 << 20


@dataclass
class Carry:
    """One device call's folder: whole files (source, path inside the folder) and its piece of the GGUF."""

    files: List[tuple] = field(default_factory=list)
    gguf_bytes: int = 0

    @property
    def load(self) -> int:
        return sum(src.stat().st_size for src, _ in self.files) + self.gguf_bytes


def tracked_bytes(repo: Path) -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True).stdout
    return sum((repo / n).stat().st_size for n in names.decode().split("\0") if n and (repo / n).is_file())


def plan(whole: List[tuple], gguf_size: int, calls: int) -> List[Carry]:
    """``whole``: (source, path in folder) -> ``calls`` carries of (nearly) equal load."""
    carries = [Carry() for _ in range(calls)]
    for src, dest in sorted(whole, key=lambda f: -f[0].stat().st_size):
        min(carries, key=lambda c: c.load).files.append((src, dest))
    # ceil: the room up to the target, summed over the carries, is at least the GGUF, so the parts hold all of it
    target = -(-(sum(c.load for c in carries) + gguf_size) // calls)
    left = gguf_size
    for carry in carries:
        carry.gguf_bytes = min(max(0, target - carry.load), left)
        left -= carry.gguf_bytes
    return carries


def write(carries: List[Carry], gguf: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    digest = hashlib.md5()  # of the parts as they are cut: together they are the whole GGUF
    with open(gguf, "rb") as source:
        part = 0
        for number, carry in enumerate(carries, start=1):
            folder = out / str(number)
            (folder / "kit").mkdir(parents=True)
            (folder / "data" / "models").mkdir(parents=True)
            (folder / "CARRY").write_text(f"call {number} of {len(carries)}\n")  # gpu_check.sh counts them
            for src, dest in carry.files:
                (folder / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, folder / dest)
            if carry.gguf_bytes:
                piece = source.read(carry.gguf_bytes)
                digest.update(piece)
                (folder / "data" / "models" / f"{GGUF}.part-{part}").write_bytes(piece)
                part += 1
    (out / "1" / "data" / "models" / f"{GGUF}.md5").write_text(f"{digest.hexdigest()}  {GGUF}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the shared folder (gpu/, data/)")
    parser.add_argument("--out", type=Path, default=REPO / ".gpucarry", help="where the numbered folders go")
    parser.add_argument("--calls", type=int, default=3, help="device calls (folders) to spread the payload over")
    args = parser.parse_args(argv)
    wheels = sorted((args.shared / "gpu").glob("*.whl"))
    gguf = args.shared / "data" / "models" / GGUF
    corpora = [args.shared / "data" / "pretrain" / name for name in CORPORA]
    missing = [str(p) for p in [gguf, *corpora] if not p.is_file()] + ([] if wheels else [f"{args.shared}/gpu/*.whl"])
    if missing:
        print(f"error: --pack: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    whole = [(w, Path("kit") / w.name) for w in wheels] + [(c, Path("data/pretrain") / c.name) for c in corpora]
    carries = plan(whole, gguf.stat().st_size, args.calls)
    tracked = tracked_bytes(REPO)
    over = [n for n, c in enumerate(carries, 1) if c.load + tracked + MARGIN > CALL_LIMIT]
    for number, carry in enumerate(carries, start=1):
        total = carry.load + tracked
        files = f"{len(carry.files)} whole file{'s' if len(carry.files) != 1 else ''}"
        print(f"{args.out}/{number}: {carry.load / MIB:.1f} MiB ({files}, GGUF {carry.gguf_bytes / MIB:.1f} MiB)"
              f" + tracked files {tracked / MIB:.1f} MiB = {total / MIB:.1f} MiB "
              f"of {CALL_LIMIT // MIB} MiB a call ({(CALL_LIMIT - total) / MIB:.1f} MiB free)")
    if over:
        print(f"error: --pack: folder(s) {over} would carry more than {CALL_LIMIT // MIB} MiB with the tracked files "
              f"(and {MARGIN // MIB} MiB for untracked ones): use --calls {args.calls + 1}", file=sys.stderr)
        return 2
    write(carries, gguf, args.out)
    rel = args.out.resolve().relative_to(REPO) if args.out.resolve().is_relative_to(REPO) else args.out
    print("Device calls, back to back (a warm machine keeps ignored folders and /tmp between calls, for 30 s idle):")
    carry_env = "" if str(rel) == ".gpucarry" else f"GPU_CARRY={rel} "
    run = f"{carry_env}GPU_REPORT=$OUT/gpu_report.md GPU_LOGS_ARCHIVE=$OUT/gpu_logs.tgz bash scripts/gpu_check.sh"
    for number in range(1, args.calls + 1):
        command = run if number == args.calls else f"du -sh {rel}"
        print(f'  {number}. carry ["{rel}/{number}"]  command: {command}')
    return 0


if __name__ == "__main__":
    sys.exit(main())

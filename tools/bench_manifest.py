"""Cost of the checkpoint manifest (checkpoint/manifest.py) per GB, beside a plain read of the same bytes.

  python tools/bench_manifest.py [--gib 2] [--files 4] [--dir /tmp]

Writes ``--files`` random files totalling ``--gib`` GiB into a scratch dir (a checkpoint's shards),
then times, in one run and from the page cache (warm; the first pass warms it): a plain read of
every byte (the floor any checksum pays), sha256 on one thread, ``write_manifest`` and
``verify_checkpoint`` (threads over files), and the size-only check. Cold-cache reads of a real
filesystem add the disk's own read time on top; the ratios to the plain read say what hashing adds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from megatron_tip.checkpoint.manifest import _THREADS, sha256_file, verify_checkpoint, write_manifest


def _read_all(paths: list[Path], block: int = 8 << 20) -> None:
    buf = bytearray(block)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_manifest_", dir=args.dir))
    try:
        per = int(args.gib * 2**30) // args.files
        chunk = os.urandom(64 << 20)
        paths = []
        for i in range(args.files):
            p = root / "model" / f"__0_{i}.distcp"
            p.parent.mkdir(exist_ok=True)
            with open(p, "wb") as f:
                left = per
                while left > 0:
                    f.write(chunk[:min(left, len(chunk))])
                    left -= len(chunk)
            paths.append(p)
        gb = sum(p.stat().st_size for p in paths) / 1e9
        _read_all(paths)  # warm the page cache: every row below reads from memory
        rows = [
            ("plain read (floor)", _time(lambda: _read_all(paths))),
            ("sha256, 1 thread", _time(lambda: [sha256_file(p) for p in paths])),
            (f"write_manifest ({_THREADS} threads)", _time(lambda: write_manifest(root))),
            (f"verify_checkpoint ({_THREADS} threads)", _time(lambda: verify_checkpoint(root))),
            ("size check only", _time(lambda: verify_checkpoint(root, checksums=False))),
        ]
        base = rows[0][1]
        print(f"{gb:.2f} GB in {args.files} files under {root} (page cache warm), {os.cpu_count()} CPUs")
        print(f"{'':34s} {'s/GB':>8s} {'GB/s':>8s} {'x plain read':>13s}")
        for name, t in rows:
            print(f"{name:34s} {t / gb:8.3f} {gb / t if t else float('inf'):8.2f} {t / base:13.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

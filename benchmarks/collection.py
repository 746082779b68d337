"""Pretraining on a large collection: memory and time against the number of listed images.

Runs ``stad pretrain-teacher --dataset collection`` on list files of growing length (the
lines cycle over a few real image files, so a million-line list needs no million files) and
reports, per run, the peak resident memory of the process, the time before training starts
(counting and hashing the listing, filling the buffer) and the training speed. The first run
lists fewer images than ``teacher.buffer_images`` (all decoded once, in memory); the others
stream through the buffer. Prints a table on stderr and one JSON object on stdout:

    python benchmarks/collection.py                         # 64, 10 000 and 1 000 000 images
    python benchmarks/collection.py --sizes 64,100000 --iterations 50 --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stad.datasets.synthetic import generate


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Run ``cmd``; its JSON result, wall time and peak RSS (from wait4, this child only)."""
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    start = time.perf_counter()
    with out.open("w") as so, err.open("w") as se:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.read_text()[-2000:]}")
    result = json.loads(out.read_text().strip().splitlines()[-1])
    return {"wall_seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "result": result}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,10000,1000000",
                        help="listed images per run, comma-separated")
    parser.add_argument("--files", type=int, default=64, help="distinct image files")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--buffer", type=int, default=512, help="teacher.buffer_images")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate(work / "gen", categories=["granite"], image_size=args.image_size,
                 n_train=args.files, n_val=0, n_test_good=0, n_test_per_defect=0, seed=0)
        files = sorted((work / "gen" / "granite" / "train" / "good").glob("*.png"))
        env = {**os.environ, "STAD_TEACHER__IMAGE_SIZE": str(args.image_size),
               "STAD_TEACHER__BUFFER_IMAGES": str(args.buffer),
               "STAD_TEACHER__DIAGNOSTIC_PATCHES": "0"}
        for n in sizes:
            listing = work / f"list{n}.txt"
            with listing.open("w") as f:
                for k in range(n):
                    f.write(f"{files[k % len(files)]}\n")
            out = work / f"teacher{n}.safetensors"
            run = _run([sys.executable, "-m", "stad", "pretrain-teacher", "--dataset",
                        "collection", "--root", str(listing), "--patch-sizes", "17",
                        "--iterations", str(args.iterations), "--device", "cpu", "--json",
                        "--out", str(out)], env, work)
            train = run["result"]["losses"]["p17"]["seconds"]
            rows.append({"listed_images": n, "streamed": run["result"]["data"]["streamed"],
                         "peak_rss_mib": round(run["peak_rss_mib"]),
                         "wall_seconds": round(run["wall_seconds"], 1),
                         "before_training_seconds": round(run["wall_seconds"] - train, 1),
                         "iterations_per_second": round(args.iterations / train, 2)})
    print(f"{'listed':>9} {'streamed':>8} {'peak RSS MiB':>12} {'wall s':>7} "
          f"{'start-up s':>10} {'it/s':>6}", file=sys.stderr)
    for r in rows:
        print(f"{r['listed_images']:>9} {str(r['streamed']):>8} {r['peak_rss_mib']:>12} "
              f"{r['wall_seconds']:>7} {r['before_training_seconds']:>10} "
              f"{r['iterations_per_second']:>6}", file=sys.stderr)
    print(json.dumps({"machine": {"cpus": os.cpu_count()}, "settings": vars(args),
                      "runs": rows}))


if __name__ == "__main__":
    main()

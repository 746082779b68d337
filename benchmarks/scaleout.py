"""Scale-out benchmark: ``fit-students`` on 1 process against ``torchrun`` on N processes.

Prints a table on stderr and one JSON object on stdout. Run from the repository root:

    python benchmarks/scaleout.py                  # 1 vs 2 processes, synthetic grain, 64×64
    python benchmarks/scaleout.py --nproc 4 --image-size 128 --epochs 2

The single process runs with all the machine's threads (``--threads``, default: the cores), each
of the N ranks with ``threads / N``, so both use the same cores and the figure is what the
distribution itself gains (or costs) on this machine. Both runs fit the same images with the
same settings; the distributed run draws other batches, so its loss is comparable, not equal.
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


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return seconds, json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--images", type=int, default=32, help="training images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--patch-sizes", default="17")
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate(work / "data", categories=["grain"], image_size=args.image_size,
                 n_train=args.images, n_val=2, n_test_good=1, n_test_per_defect=1, seed=0)
        fit = ["fit-students", "--dataset", "synthetic", "--root", str(work / "data"),
               "--category", "grain", "--teacher", "random", "--device", "cpu", "--json",
               "--patch-sizes", args.patch_sizes, "--image-size", str(args.image_size),
               "--epochs", str(args.epochs), "--students", "3", "--preset", "fast"]
        base = {**os.environ, "STAD_STUDENTS__BATCH_SIZE": str(args.batch_size)}
        rows = []
        one_env = {**base, "OMP_NUM_THREADS": str(args.threads)}
        t1, r1 = _run([sys.executable, "-m", "stad", *fit, "--out", str(work / "one.st")],
                      one_env, work)
        rows.append({"processes": 1, "threads_each": args.threads, "seconds": t1,
                     "fit_seconds": r1["seconds"], "final_loss": r1["final_loss"]})
        each = max(1, args.threads // args.nproc)
        n_env = {**base, "OMP_NUM_THREADS": str(each)}
        tn, rn = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={args.nproc}", "-m", "stad", *fit,
                       "--out", str(work / "many.st")], n_env, work)
        rows.append({"processes": args.nproc, "threads_each": each, "seconds": tn,
                     "fit_seconds": rn["seconds"], "final_loss": rn["final_loss"]})

    result = {"machine": {"cpus": os.cpu_count()}, "settings": vars(args), "runs": rows,
              "speedup_fit": rows[0]["fit_seconds"] / rows[1]["fit_seconds"],
              "speedup_wall": rows[0]["seconds"] / rows[1]["seconds"],
              "note": f"{args.nproc} processes at batch {args.batch_size} each: an epoch has "
                      f"1/{args.nproc} of the steps of one process at the same batch"}
    print(f"{'processes':>9} {'threads':>7} {'wall s':>8} {'fit s':>8}  final loss",
          file=sys.stderr)
    for row in rows:
        print(f"{row['processes']:>9} {row['threads_each']:>7} {row['seconds']:>8.1f} "
              f"{row['fit_seconds']:>8.1f}  {row['final_loss']}", file=sys.stderr)
    print(f"speed-up (fit): {result['speedup_fit']:.2f}x, wall: {result['speedup_wall']:.2f}x",
          file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

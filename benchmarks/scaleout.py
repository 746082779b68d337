"""Scale-out benchmark: ``fit-students`` on 1 process against ``torchrun`` on N processes, or
against one process per scale joined by ``stad merge-models`` (``--per-scale``).

Prints a table on stderr and one JSON object on stdout. Run from the repository root:

    python benchmarks/scaleout.py                  # 1 vs 2 processes, synthetic grain, 64×64
    python benchmarks/scaleout.py --nproc 4 --image-size 128 --epochs 2
    python benchmarks/scaleout.py --per-scale --patch-sizes 17,33 --image-size 128 --min-steps 200

With ``--per-scale`` the scales are fitted at the same time, one process each with
``threads / scales`` threads, and merged. The steps and batches are those of the one process,
but with other thread counts rounding differs and the weights drift apart over the steps; the
largest difference of any weight is reported.

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
    return seconds, _last_json(done.stdout)


def _last_json(stdout: str) -> dict:
    """The last JSON line a ``--json`` command printed (its result)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _per_scale(fit: list[str], env: dict[str, str], work: Path, threads: int,
               patch_sizes: str) -> dict:
    """Every scale of ``fit`` in its own process, all at once, then ``merge-models``."""
    sizes = patch_sizes.split(",")
    each = max(1, threads // len(sizes))
    start = time.perf_counter()
    running = []
    for p in sizes:
        cmd = [sys.executable, "-m", "stad", *fit, "--patch-sizes", p,
               "--out", str(work / f"p{p}.st")]
        running.append((cmd, subprocess.Popen(cmd, env={**env, "OMP_NUM_THREADS": str(each)},
                                              cwd=work, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)))
    fits = []
    for cmd, proc in running:
        out, err = proc.communicate()
        if proc.returncode != 0:
            for _, other in running:  # none may outlive the temporary folder
                other.kill()
                other.wait()
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
        fits.append(_last_json(out))
    _run([sys.executable, "-m", "stad", "merge-models", *(str(work / f"p{p}.st") for p in sizes),
          "--out", str(work / "merged.st"), "--json"], env, work)
    seconds = time.perf_counter() - start
    return {"processes": f"{len(sizes)} (one per scale)", "threads_each": each,
            "seconds": seconds, "fit_seconds": max(f["seconds"] for f in fits),
            "final_loss": {k: v for f in fits for k, v in f["final_loss"].items()}}


def _max_difference(a: Path, b: Path) -> float:
    from stad.artifacts import load_artifact

    ta, tb = load_artifact(a).tensors, load_artifact(b).tensors
    if sorted(ta) != sorted(tb):
        sys.exit(f"{a} and {b} hold different tensors")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--images", type=int, default=32, help="training images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--patch-sizes", default="17")
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--min-steps", type=int, default=0, help="students.min_steps")
    parser.add_argument("--per-scale", action="store_true",
                        help="one process per scale, merged, instead of torchrun")
    args = parser.parse_args(argv)
    if args.per_scale and len(args.patch_sizes.split(",")) < 2:
        parser.error("--per-scale needs at least two --patch-sizes (one process each)")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate(work / "data", categories=["grain"], image_size=args.image_size,
                 n_train=args.images, n_val=2, n_test_good=1, n_test_per_defect=1, seed=0)
        fit = ["fit-students", "--dataset", "synthetic", "--root", str(work / "data"),
               "--category", "grain", "--teacher", "random", "--device", "cpu", "--json",
               "--patch-sizes", args.patch_sizes, "--image-size", str(args.image_size),
               "--epochs", str(args.epochs), "--min-steps", str(args.min_steps), "--students", "3",
               "--preset", "fast"]
        base = {**os.environ, "STAD_STUDENTS__BATCH_SIZE": str(args.batch_size)}
        rows = []
        one_env = {**base, "OMP_NUM_THREADS": str(args.threads)}
        t1, r1 = _run([sys.executable, "-m", "stad", *fit, "--out", str(work / "one.st")],
                      one_env, work)
        rows.append({"processes": 1, "threads_each": args.threads, "seconds": t1,
                     "fit_seconds": r1["seconds"], "final_loss": r1["final_loss"]})
        if args.per_scale:
            rows.append(_per_scale(fit, base, work, args.threads, args.patch_sizes))
            rows[-1]["max_weight_difference"] = _max_difference(work / "one.st",
                                                                work / "merged.st")
        else:
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
              "note": "one process per scale, merged: the same steps and batches as one process"
                      if args.per_scale else
                      f"{args.nproc} processes at batch {args.batch_size} each: an epoch has "
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

"""How well one student learns to regress its teacher in a given budget: a cheap proxy for
choosing the students' schedule (docs/quality.md, "The students' schedule").

    python benchmarks/student_proxy.py --set coffee --patch-size 17 --lr 1e-3 \
        --schedule cosine --steps 150 [--crop 64 --batch 4] [--teacher FILE] [--data DIR]

One student of scale p (not the ensemble of three: a third of the cost, and the regression
error is what a schedule changes) is trained on random crops of the set's first 50 training
images as ``stad fit-students`` trains each student (Adam, weight decay 1e-5, the crop seen
with its context, the loss the squared distance to the normalized teacher descriptors, bf16
autocast where the CPU computes it natively); the schedule is ``stad``'s
(``students.lr_schedule``). It reports the training loss (mean of the last 20 steps) and the
held-out loss, the same distance on the set's last 10 training images, five times during the
run. A student that regresses normal images more closely leaves a lower floor under the
anomaly maps; whether that carries over to AU-PRO is for ``benchmarks/quality.py`` to say.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
import realsets  # noqa: E402

from stad.datasets.base import Sample  # noqa: E402
from stad.devices import resolve_precision  # noqa: E402
from stad.model import PADDING, resolve_teachers  # noqa: E402
from stad.networks import build_network  # noqa: E402
from stad.training.students import load_batch, scheduled_lr, teacher_targets  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="coffee", choices=list(realsets.SETS))
    parser.add_argument("--patch-size", type=int, default=17, choices=[17, 33, 65])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--teacher", default="builtin")
    parser.add_argument("--data", type=Path, default=None,
                        help="where generated sets are kept (default $STAD_CACHE/realsets)")
    parser.add_argument("--n-fit", type=int, default=50)
    parser.add_argument("--n-val", type=int, default=10)
    args = parser.parse_args(argv)
    p, size = args.patch_size, args.image_size
    params = realsets.Params(image_size=size, n_train=args.n_fit + args.n_val)
    _, root = quality.prepare(args.set, args.data or quality.cache_dir() / "realsets", params, 0)
    files = sorted((root / args.set / "train" / "good").iterdir())
    samples = [Sample(image=f, mask=None, label="normal", split="train") for f in files]
    images = load_batch(samples[:args.n_fit], size)
    held = load_batch(samples[args.n_fit:args.n_fit + args.n_val], size)
    teacher = resolve_teachers(args.teacher, [p], 0)[0][p]
    bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    start = time.perf_counter()
    targets, mean, std = teacher_targets(teacher, images)
    with torch.inference_mode():
        held_targets = ((teacher.dense(held, padding_mode=PADDING) - mean.view(1, -1, 1, 1))
                        / std.view(1, -1, 1, 1))
    padded = teacher.pad(images, padding_mode=PADDING)
    rf = teacher.receptive_field
    student = build_network(p, teacher.out_dim,
                            generator=torch.Generator().manual_seed(123)).train()
    opt = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(7)

    def held_loss() -> float:
        student.eval()
        with torch.inference_mode():
            out = student.dense(held, padding_mode=PADDING)
        student.train()
        return float((out - held_targets).pow(2).sum(1).mean())

    losses: list[float] = []
    curve = []
    crop = min(args.crop, size)
    for k in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(k, args.steps, args.lr, args.schedule)
        idx = torch.randint(len(images), (args.batch,), generator=gen).tolist()
        hi = size - crop + 1
        corners = [(int(torch.randint(hi, (1,), generator=gen)),
                    int(torch.randint(hi, (1,), generator=gen))) for _ in idx]
        x = torch.stack([padded[i, :, r:r + crop + rf - 1, c:c + crop + rf - 1]
                         for i, (r, c) in zip(idx, corners, strict=True)])
        t = torch.stack([targets[i, :, r:r + crop, c:c + crop]
                         for i, (r, c) in zip(idx, corners, strict=True)]).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = student.dense_valid(x)
        loss = (out.float() - t).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (k + 1) % max(1, args.steps // 5) == 0:
            point = {"step": k + 1, "train": sum(losses[-10:]) / len(losses[-10:]),
                     "held_out": held_loss(), "seconds": round(time.perf_counter() - start)}
            curve.append(point)
            print(json.dumps(point), file=sys.stderr)
    last = losses[-20:]
    out = {"set": args.set, "patch_size": p, "lr": args.lr, "schedule": args.schedule,
           "steps": args.steps, "crop": crop, "batch": args.batch, "bf16": bf16,
           "train_last20": sum(last) / len(last), "held_out": held_loss(), "curve": curve,
           "seconds": round(time.perf_counter() - start)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

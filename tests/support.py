"""Pieces several test files share (on sys.path through pytest's ``pythonpath = ["tests"]``)."""

from __future__ import annotations

from hypothesis import strategies as st

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

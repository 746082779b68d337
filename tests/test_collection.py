"""Large collections for pretraining: the streaming ``collection`` adapter, the one-pass scan,
and the refreshed image buffer (stad.datasets.collection, stad.datasets.selection,
stad.training.imagebuffer)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import stad.training.imagebuffer as imagebuffer
from stad.cli import app
from stad.config import resolve_settings
from stad.datasets.collection import CollectionAdapter
from stad.datasets.selection import select_data
from stad.distributed import World
from stad.errors import DataError
from stad.images import load_image, to_tensor
from stad.training.imagebuffer import ImageBuffer, ImageSource

SIZE = 8


def _images(folder: Path, n: int) -> list[Path]:
    """n solid-colour PNGs; image k has red level 10·k + 5 (told apart after decoding)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = folder / f"img{k:03d}.png"
        Image.fromarray(np.full((SIZE, SIZE, 3), (10 * k + 5, 40, 90), np.uint8)).save(path)
        paths.append(path)
    return paths


def _index(tensor: torch.Tensor) -> int:
    """Which of :func:`_images` a decoded, standardized tensor is."""
    red = tensor[0, 0, 0].item() * 0.229 + 0.485  # undo the standardization
    return round((red * 255 - 5) / 10)


def _source(paths: list[Path]) -> ImageSource:
    from stad.datasets.base import Sample
    samples = [Sample(image=p, mask=None, label="normal", split="train") for p in paths]
    return ImageSource.of(samples)


# --- the adapter ---------------------------------------------------------------------------


def test_folder_walk_is_sorted_recursive_and_skips_hidden_and_non_images(tmp_path: Path) -> None:
    _images(tmp_path / "b", 2)
    _images(tmp_path / "a" / "deep", 1)
    _images(tmp_path / ".hidden", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "link").symlink_to(tmp_path / "b", target_is_directory=True)
    adapter = CollectionAdapter()
    found = [s.image.relative_to(tmp_path).as_posix()
             for s in adapter.samples(tmp_path, "all", "train")]
    assert found == ["a/deep/img000.png", "b/img000.png", "b/img001.png"]
    assert adapter.categories(tmp_path) == ["all"]
    assert list(adapter.samples(tmp_path, "all", "test")) == []
    assert all(s.label == "normal" and s.split == "train"
               for s in adapter.samples(tmp_path, "all", "train"))


def test_list_file_paths_are_relative_to_it_and_comments_skipped(tmp_path: Path) -> None:
    a, b = _images(tmp_path / "imgs", 2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\nimgs/{a.name}\n\n{b}\n")
    assert [s.image for s in CollectionAdapter().samples(listing, "all", "train")] == [a, b]


@pytest.mark.parametrize("content, message", [
    ("imgs/a.png\nnotes.txt\n", r"list.txt:2: 'notes.txt' is not an image file"),
    (b"\xff\xfe\x00bad", "is not a UTF-8 text file"),
    ("imgs/a.png\nimgs/b\0c.png\n", r"list.txt:2: .* holds a NUL character"),
])
def test_a_bad_list_file_names_the_line(tmp_path: Path, content: str | bytes,
                                        message: str) -> None:
    listing = tmp_path / "list.txt"
    if isinstance(content, bytes):
        listing.write_bytes(content)
    else:
        listing.write_text(content)
    with pytest.raises(DataError, match=message):
        list(CollectionAdapter().samples(listing, "all", "train"))


def test_missing_root_and_other_categories_are_refused(tmp_path: Path) -> None:
    adapter = CollectionAdapter()
    with pytest.raises(DataError, match="neither a folder nor a list file"):
        list(adapter.samples(tmp_path / "nowhere", "all", "train"))
    with pytest.raises(DataError, match="neither a folder nor a list file"):
        adapter.categories(tmp_path / "nowhere")
    with pytest.raises(DataError, match="pass --category all"):
        list(adapter.samples(tmp_path, "bottle", "train"))


@pytest.mark.parametrize("command", [["datasets", "show"],
                                     ["pretrain-teacher", "--out", "teacher.safetensors"]])
def test_a_mistyped_root_is_a_data_error_naming_it(tmp_path: Path, command: list[str]) -> None:
    root = tmp_path / "phtos.txt"
    result = CliRunner().invoke(app, [*command, "--dataset", "collection", "--root", str(root)])
    assert result.exit_code == 3, result.output
    assert f"collection root {root} is neither a folder nor a list file" in result.stderr


def test_datasets_show_counts_a_collection(tmp_path: Path) -> None:
    _images(tmp_path / "a", 3)
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "collection", "--root",
                                      str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    splits = json.loads(result.stdout)["splits"]
    assert splits["train"]["images"] == splits["train"]["normal"] == 3
    assert splits["test"]["images"] == 0


def test_the_only_category_needs_no_flag(tmp_path: Path) -> None:
    settings = resolve_settings({"dataset": "collection", "root": tmp_path}, environ={})
    assert select_data(settings).category == "all"


def test_a_long_list_is_streamed_not_held(tmp_path: Path) -> None:
    (image,) = _images(tmp_path, 1)
    n = 50_000
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image.name}\n" * n)
    settings = resolve_settings({"dataset": "collection", "root": listing}, environ={})
    selection = select_data(settings)
    tracemalloc.start()
    try:
        count = sum(1 for _ in selection.iter_samples("train"))
        scanned = selection.scan("train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == scanned.count == n
    # A list of 50 000 samples would take about 10 MiB; the stream holds one at a time.
    assert peak < 1 << 20, peak


def test_scan_identifies_the_listing_and_names_a_missing_file(tmp_path: Path) -> None:
    a, b = _images(tmp_path / "imgs", 2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/{a.name}\nimgs/{b.name}\n")
    selection = select_data(resolve_settings({"dataset": "collection", "root": listing},
                                             environ={}))
    first = selection.scan("train")
    assert first == selection.scan("train") and first.count == 2
    b.write_bytes(a.read_bytes() + b"\0")  # another size: another listing
    assert selection.scan("train").sha256 != first.sha256
    b.unlink()
    with pytest.raises(DataError, match=f"cannot read {b}"):
        selection.scan("train")


# --- the buffer ----------------------------------------------------------------------------


def test_a_share_that_fits_is_decoded_once_and_kept(tmp_path: Path) -> None:
    paths = _images(tmp_path, 5)
    with ImageBuffer(_source(paths), size=SIZE, capacity=5) as buffer:
        buffer.start()
        assert not buffer.streaming
        assert [_index(t) for t in buffer.images] == [0, 1, 2, 3, 4]
        before = buffer.images.clone()
        buffer.refresh(torch.Generator().manual_seed(0))
        buffer.start()
        assert torch.equal(buffer.images, before)
    expected = to_tensor(load_image(paths[2]), size=SIZE)
    assert torch.allclose(before[2], expected)


def test_a_stream_refreshes_slots_and_decodes_each_image_once_per_visit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _images(tmp_path, 10)
    decoded: list[str] = []
    decode = imagebuffer._decode
    monkeypatch.setattr(imagebuffer, "_decode",
                        lambda s, size: (decoded.append(s.image.name), decode(s, size))[1])
    gen = torch.Generator().manual_seed(0)
    with ImageBuffer(_source(paths), size=SIZE, capacity=4, refresh=2) as buffer:
        buffer.start()
        assert buffer.streaming and buffer.images.shape == (4, 3, SIZE, SIZE)
        assert [_index(t) for t in buffer.images] == buffer.positions == [0, 1, 2, 3]
        for _ in range(6):  # 12 new images: the stream wraps round after image 9
            buffer.refresh(gen)
            assert [_index(t) for t in buffer.images] == buffer.positions
        assert buffer.next == 6  # 4 + 12 = 16 read: positions 0‥9 then 0‥5
        assert set(buffer.positions) <= set(range(10))
    # Decoded: the 4 of the fill, the 12 taken, and at most `ahead` (4) read ahead.
    assert 16 <= len(decoded) <= 16 + 4 + 1


def test_a_restored_stream_continues_as_the_uninterrupted_one(tmp_path: Path) -> None:
    paths = _images(tmp_path, 9)

    def run(steps: int, state: torch.Tensor | None = None, gen_state: torch.Tensor | None = None
            ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        if gen_state is not None:
            gen.set_state(gen_state)
        seen = []
        with ImageBuffer(_source(paths), size=SIZE, capacity=3) as buffer:
            buffer.start()
            if state is not None:
                buffer.start(state)
            for _ in range(steps):
                buffer.refresh(gen)
                seen.append([_index(t) for t in buffer.images])
            return seen, buffer.state(), gen.get_state()

    whole, _, _ = run(14)
    head, state, gen_state = run(5)
    tail, _, _ = run(9, state, gen_state)
    assert head + tail == whole
    # A state saved by 2 processes means another share: the buffer starts afresh instead.
    other = state.clone()
    other[-1] = 2
    fresh, _, _ = run(9, other, gen_state)
    assert fresh != tail


def test_a_stream_emptied_during_the_run_is_an_error_not_a_hang(tmp_path: Path) -> None:
    paths = _images(tmp_path, 3)
    rounds = []

    def listing():  # the first round lists the 3 images, later ones nothing
        rounds.append(1)
        return iter(_source(paths).open() if len(rounds) == 1 else [])

    gen = torch.Generator().manual_seed(0)
    with ImageBuffer(ImageSource(open=listing, count=3, name="list.txt"), size=SIZE,
                     capacity=2) as buffer:
        buffer.start()
        buffer.refresh(gen)  # image 2, the last of the first round
        with pytest.raises(DataError, match="no image is listed in list.txt any more"):
            buffer.refresh(gen)


def test_ranks_read_disjoint_shares(tmp_path: Path) -> None:
    paths = _images(tmp_path, 7)
    seen = []
    for rank in (0, 1):
        world = World(rank=rank, size=2)
        with ImageBuffer(_source(paths), size=SIZE, capacity=8, world=world) as buffer:
            buffer.start()
            seen.append([_index(t) for t in buffer.images])
    assert seen == [[0, 2, 4, 6], [1, 3, 5]]


def test_a_stream_skips_unreadable_images_and_counts_them(tmp_path: Path) -> None:
    paths = _images(tmp_path, 6)
    paths[1].write_bytes(b"not a png")
    gen = torch.Generator().manual_seed(0)
    with ImageBuffer(_source(paths), size=SIZE, capacity=2) as buffer:
        buffer.start()
        assert [_index(t) for t in buffer.images] == [0, 2]
        for _ in range(4):
            buffer.refresh(gen)
        skipped = buffer.skipped()
    # (The reader may have met it again on its next round, reading ahead.)
    assert skipped["count"] >= 1 and str(paths[1]) in skipped["first"][0]
    with ImageBuffer(_source(paths), size=SIZE, capacity=6) as buffer, \
            pytest.raises(DataError, match=str(paths[1])):
        buffer.start()  # everything fits: an unreadable image stops the run, as elsewhere


def test_a_stream_of_only_unreadable_images_is_an_error(tmp_path: Path) -> None:
    paths = _images(tmp_path, 3)
    for path in paths:
        path.write_bytes(b"broken")
    with ImageBuffer(_source(paths), size=SIZE, capacity=2) as buffer, \
            pytest.raises(DataError, match="none of the 3 images"):
        buffer.start()


# --- the command ---------------------------------------------------------------------------


def test_pretrain_teacher_streams_a_list_file(tmp_path: Path) -> None:
    paths = _images(tmp_path / "imgs", 6)
    paths[4].write_bytes(b"truncated")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"imgs/{p.name}\n" for p in paths))
    out = tmp_path / "teacher.safetensors"
    env = {"STAD_TEACHER__IMAGE_SIZE": "20", "STAD_TEACHER__BATCH_SIZE": "4",
           "STAD_TEACHER__BUFFER_IMAGES": "3", "STAD_TEACHER__DIAGNOSTIC_PATCHES": "0"}
    result = CliRunner().invoke(app, [
        "pretrain-teacher", "--dataset", "collection", "--root", str(listing),
        "--patch-sizes", "17", "--iterations", "5", "--device", "cpu", "--out", str(out),
        "--json"], env=env)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["data"]["n_images"] == 6 and info["data"]["category"] == "all"
    assert info["losses"]["p17"]["skipped"]["count"] >= 1
    assert "unreadable image(s) of the stream" in result.stderr
    assert out.is_file()


def test_inspect_teacher_reads_evenly_spaced_images_of_a_collection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stad.commands.train as train

    (image,) = _images(tmp_path, 1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image.name}\n" * 1000)
    read: list[int] = []
    monkeypatch.setattr(train, "INSPECT_MAX_IMAGES", 4)
    real = imagebuffer.load_images
    monkeypatch.setattr(imagebuffer, "load_images",
                        lambda samples, size, **kw: (read.append(len(samples)),
                                                     real(samples, size, **kw))[1])
    result = CliRunner().invoke(app, [
        "inspect-teacher", "--teacher", "random", "--dataset", "collection", "--root",
        str(listing), "--patch-sizes", "17", "--patches", "8", "--json"],
        env={"STAD_TEACHER__IMAGE_SIZE": "20"})
    assert result.exit_code == 0, result.output
    assert read == [4] and json.loads(result.stdout)["data"]["n_images"] == 4

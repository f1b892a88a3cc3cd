"""Moving Fashion-MNIST action clips (MP4s decodable with PyAV, annotation files, determinism, idempotence, the
reversed-pair property, motion visible in the decoded video, captions, CLI) and the frame-strip picture."""
import csv
import gzip
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from florence.benchmarks import moving_fmnist as mf
from florence.benchmarks.detection_canvas import CanvasError
from florence.benchmarks.draw_video import frame_strip_png
from florence.data.errors import DataNotFound
from florence.data.sources import FASHION_MNIST_CLASSES, FashionMNISTSource


@pytest.fixture(scope="module")
def small(tmp_path_factory, fake_fmnist):
    """16 train clips (two per class) of the fake Fashion-MNIST with the default settings."""
    out = tmp_path_factory.mktemp("mfm")
    return out, mf.generate(out, "train", 16, seed=0, root=fake_fmnist)


def _decode(path: Path) -> tuple[str, np.ndarray]:
    with av.open(str(path)) as container:
        name = container.streams.video[0].codec_context.name
        return name, np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _yuv420p(frames: np.ndarray) -> np.ndarray:
    """RGB frames through yuv420p and back (chroma at half resolution costs ~3 levels on these colourful textures,
    before any compression)."""
    return np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(
        format="rgb24").astype(int) for f in frames])


def _rendered(root: Path, split: str, video_id: int, seed: int = 0, **kwargs) -> mf.Clip:
    source = FashionMNISTSource(root, split=split)
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split], video_id])
    return mf.render_clip(rng, (video_id - 1) % 8, source.images, source.labels, **kwargs)


def test_files_and_decoded_clips(small, fake_fmnist):
    out, manifest = small
    assert not manifest["skipped"] and manifest["codec"] == "libx264"
    assert (out / "classes.txt").read_text().split() == list(mf.ACTIONS) == [
        "move_left", "move_right", "move_up", "move_down", "rotate_clockwise", "rotate_anticlockwise", "grow",
        "shrink"]
    lines = [line.split() for line in (out / "train.txt").read_text().splitlines()]
    assert lines == [[f"{i:06d}.mp4", str((i - 1) % 8)] for i in range(1, 17)]
    assert manifest["label_counts"] == dict.fromkeys(mf.ACTIONS, 2)
    assert manifest["params"]["frames"] == 16 and manifest["params"]["size"] == 64
    for name, label in lines:
        codec, frames = _decode(out / "train" / name)
        assert codec == "h264" and frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
        expected = _yuv420p(_rendered(fake_fmnist, "train", int(name[:6])).frames)
        error = np.abs(frames.astype(int) - expected).mean(axis=(1, 2, 3))
        assert error.max() < 3, (name, error)  # CRF 18 keeps the clip crisp (the pixel noise alone: ~2 levels)
    with av.open(str(out / "train" / "000001.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 8 and stream.codec_context.pix_fmt == "yuv420p"


def test_layout_and_captions(small, fake_fmnist):
    out, _ = small
    source = FashionMNISTSource(fake_fmnist, split="train")
    layout = json.loads((out / "layout_train.json").read_text())["videos"]
    with open(out / "captions_train.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["video", "caption"] and [r[0] for r in rows[1:]] == [v["video"] for v in layout]
    counts = set()
    for (_, text), video in zip(rows[1:], layout):
        items = video["items"]
        assert [it["role"] for it in items] == ["actor", "static"][:len(items)]
        classes = [int(source.labels[it["source_index"]]) for it in items]  # the items' true Fashion-MNIST classes
        assert [it["class"] for it in items] == classes and len(set(classes)) == len(classes)
        names = [FASHION_MNIST_CLASSES[c] for c in classes]
        assert text == "a video of a " + " and a ".join(names)
        counts.add(len(items))
    assert counts == {1, 2}
    assert mf.caption([5]) == "a video of a Sandal" and mf.caption([5, 8]) == "a video of a Sandal and a Bag"


def test_test_split_uses_test_items(tmp_path, fake_fmnist):
    mf.generate(tmp_path, "test", 3, seed=0, root=fake_fmnist)
    _, frames = _decode(tmp_path / "test" / "000002.mp4")
    assert np.abs(frames.astype(int) - _yuv420p(_rendered(fake_fmnist, "test", 2).frames)).mean() < 3
    # a Sandal from the train items only would need index 5, 15, 25, 35; the test split has 20 items
    layout = json.loads((tmp_path / "layout_test.json").read_text())["videos"]
    assert all(it["source_index"] < 20 for v in layout for it in v["items"])


def test_deterministic_and_idempotent(tmp_path, small, fake_fmnist):
    out, manifest = small
    names = [f"{i:06d}.mp4" for i in range(1, 17)]
    again = mf.generate(tmp_path / "a", "train", 8, seed=0, root=fake_fmnist)  # fewer clips: the same first eight
    assert again["codec"] == "libx264"
    assert all((tmp_path / "a" / "train" / n).read_bytes() == (out / "train" / n).read_bytes() for n in names[:8])
    mtimes = [(out / "train" / n).stat().st_mtime_ns for n in names]
    same = mf.generate(out, "train", 16, seed=0, root=fake_fmnist)
    assert same["skipped"] and same["videos_sha256"] == manifest["videos_sha256"]
    assert mtimes == [(out / "train" / n).stat().st_mtime_ns for n in names]
    other = mf.generate(tmp_path / "b", "train", 8, seed=1, root=fake_fmnist)
    assert other["videos_sha256"] != again["videos_sha256"]
    # a changed file is noticed and rewritten; a smaller run removes the clips above it
    (tmp_path / "a" / "train" / names[3]).write_bytes(b"broken")
    assert not mf.generate(tmp_path / "a", "train", 8, seed=0, root=fake_fmnist)["skipped"]
    assert (tmp_path / "a" / "train" / names[3]).read_bytes() == (out / "train" / names[3]).read_bytes()
    assert not mf.generate(tmp_path / "a", "train", 5, seed=0, root=fake_fmnist)["skipped"]
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == names[:5]
    assert len((tmp_path / "a" / "train.txt").read_text().splitlines()) == 5


def test_reversed_pair_plays_the_same_frames_backwards(fake_fmnist):
    source = FashionMNISTSource(fake_fmnist, split="train")
    for seed in range(3):
        for first in (0, 2, 4, 6):
            forward = mf.render_clip(np.random.default_rng(seed), first, source.images, source.labels)
            backward = mf.render_clip(np.random.default_rng(seed), first + 1, source.images, source.labels)
            assert np.array_equal(backward.frames, forward.frames[::-1])
            assert backward.caption == forward.caption and backward.label == first + 1
            assert backward.layout["motion"]["centre"] == forward.layout["motion"]["centre"][::-1]
            assert not np.array_equal(forward.frames[0], forward.frames[-1])  # it does move


def test_render_alpha_hand_worked():
    # a 2x2 blob at rows 2-3, columns 13-14 of the 28x28 item: its centre is (14, 3) in pixel-edge coordinates, i.e.
    # (0, -11) from the item's centre (14, 14). Drawn at full size (side 28) around (32, 32) it sits at (32, 21);
    # turned 90 degrees clockwise on screen (y down: (x, y) -> (-y, x)) at (43, 32); at side 56 (x2) and 0 degrees
    # at (32, 10); at 180 degrees at (32, 43).
    item = np.zeros((28, 28), np.uint8)
    item[2:4, 13:15] = 255
    centres = np.full((4, 2), 32.0)
    alpha = mf.render_alpha(item, centres, np.array([0.0, 90.0, 0.0, 180.0]), np.array([28.0, 28.0, 56.0, 28.0]), 64)
    yy, xx = np.mgrid[:64, :64] + 0.5
    got = [((a * xx).sum() / a.sum(), (a * yy).sum() / a.sum()) for a in alpha]
    np.testing.assert_allclose(got, [(32, 21), (43, 32), (32, 10), (32, 43)], atol=0.05)
    np.testing.assert_allclose(alpha.sum(axis=(1, 2)) / alpha[0].sum(), [1, 1, 4, 1], rtol=0.02)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> Path:
    """Fashion-MNIST-shaped idx files whose items are all one long horizontal bar (an unambiguous orientation)."""
    root = tmp_path_factory.mktemp("bars")
    images = np.zeros((10, 28, 28), np.uint8)
    images[:, 11:17, 2:26] = 255
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(10))
    return root


def _orientation(mask: np.ndarray) -> float:
    """The principal axis angle of a (H, W) mask in degrees, image coordinates (y down: positive = clockwise)."""
    yy, xx = np.nonzero(mask)
    dx, dy = xx - xx.mean(), yy - yy.mean()
    return float(np.degrees(0.5 * np.arctan2(2 * (dx * dy).mean(), (dx * dx).mean() - (dy * dy).mean())))


def test_motion_visible_in_decoded_video(tmp_path, bars, monkeypatch):
    # a flat dark background and no noise, so the item is the bright pixels of the decoded frames
    monkeypatch.setattr(mf, "background", lambda rng, size: np.full((size, size, 3), 0.1, np.float32))
    mf.generate(tmp_path, "train", 16, seed=0, items=(1, 1), noise=0.0, root=bars)
    for line in (tmp_path / "train.txt").read_text().splitlines():
        name, label = line.split()
        _, frames = _decode(tmp_path / "train" / name)
        masks = frames.max(axis=3) > 100  # item colours have value >= 0.75, the background 0.1
        yy, xx = np.mgrid[:64, :64]
        cx = np.array([xx[m].mean() for m in masks])
        cy = np.array([yy[m].mean() for m in masks])
        area = masks.sum(axis=(1, 2))
        turn = ((np.diff([_orientation(m) for m in masks]) + 90) % 180 - 90).sum()  # axis steps, unwrapped
        action = mf.ACTIONS[int(label)]
        moved = {"move_left": cx[0] - cx[-1], "move_right": cx[-1] - cx[0], "move_up": cy[0] - cy[-1],
                 "move_down": cy[-1] - cy[0]}
        if action in moved:
            assert moved[action] >= 11 and abs(turn) < 3, (name, action, cx, cy)
            path = cx if action in ("move_left", "move_right") else cy
            steps = np.diff(path) * (1 if action in ("move_right", "move_down") else -1)
            assert steps.min() > 0.2, (name, action, path)  # steadily, every frame
        elif action.startswith("rotate"):
            assert (turn if action == "rotate_clockwise" else -turn) >= 55, (name, action, turn)
            assert np.hypot(cx[-1] - cx[0], cy[-1] - cy[0]) < 1.5
        else:
            ratio = area[-1] / area[0]
            assert (ratio if action == "grow" else 1 / ratio) >= 2.2, (name, action, area)
            assert abs(turn) < 3


def test_other_codec_and_bad_parameters(tmp_path, fake_fmnist):
    manifest = mf.generate(tmp_path, "train", 2, seed=0, codec="mpeg4", root=fake_fmnist)
    assert manifest["codec"] == "mpeg4" and manifest["params"]["crf"] is None
    codec, frames = _decode(tmp_path / "train" / "000001.mp4")
    assert codec == "mpeg4" and frames.shape == (16, 64, 64, 3)
    assert np.abs(frames.astype(int) - _yuv420p(_rendered(fake_fmnist, "train", 1).frames)).mean() < 3
    short = mf.generate(tmp_path / "s", "train", 1, seed=0, frames=8, size=32, root=fake_fmnist)
    assert _decode(tmp_path / "s" / "train" / "000001.mp4")[1].shape == (8, 32, 32, 3) and not short["skipped"]
    for kwargs, message in (({"size": 63}, "size must be even"), ({"items": (0, 1)}, "items must"),
                            ({"codec": "vp9"}, "codec must"), ({"frames": 1}, "frames must"),
                            ({"noise": -1.0}, "noise must")):
        with pytest.raises(CanvasError, match=message):
            mf.generate(tmp_path, "train", 2, seed=0, root=fake_fmnist, **kwargs)
    with pytest.raises(CanvasError, match="split must"):
        mf.generate(tmp_path, "val", 2, seed=0, root=fake_fmnist)
    with pytest.raises(DataNotFound, match="Fashion-MNIST file not found"):
        mf.generate(tmp_path, "train", 2, seed=0, root=tmp_path / "none")


def test_cli(tmp_path, fake_fmnist, capsys):
    args = ["--out", str(tmp_path), "--train", "3", "--test", "2", "--root", str(fake_fmnist)]
    assert mf.main(args) == 0
    assert "train: 3 clips written" in capsys.readouterr().out
    assert len((tmp_path / "test.txt").read_text().splitlines()) == 2 and (tmp_path / "captions_test.csv").is_file()
    assert mf.main(args) == 0 and "up to date" in capsys.readouterr().out
    assert mf.main(args + ["--size", "33"]) == 2 and "moving_fmnist: size must be even" in capsys.readouterr().err


def test_frame_strip_png(tmp_path):
    frames = np.zeros((16, 8, 10, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(16)[:, None, None] * 16
    path = frame_strip_png(frames, tmp_path / "strip.png", title="top-5: move_left 0.91\nmove_right 0.05", every=2,
                           scale=3)
    with Image.open(path) as im:
        strip = np.asarray(im.convert("RGB"))
    bare = np.asarray(Image.open(frame_strip_png(frames, tmp_path / "bare.png", every=2, scale=3)).convert("RGB"))
    assert strip.shape[1] == bare.shape[1] == 8 * 30 + 7 * 2 + 2 * 6 and strip.shape[0] > bare.shape[0]
    # the frames are there, enlarged 3x: the k-th tile (from x = 6 + 32 k, y = 6) is frame 2k
    for k in range(8):
        tile = bare[6:6 + 24, 6 + 32 * k:6 + 32 * k + 30]
        assert (tile == [32 * k, 0, 0]).all()
        assert (bare[6:30, 6 + 32 * k + 30:6 + 32 * k + 32] == 255).all() or k == 7  # the gap
    with pytest.raises(ValueError, match="frames must be"):
        frame_strip_png(frames[0], tmp_path / "x.png")

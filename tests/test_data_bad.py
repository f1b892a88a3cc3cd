"""Bad input for the data pipeline: each kind is fed, skipped + logged, or raised with the file named."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from florence.data import (
    BadSample,
    BadSampleError,
    build_train_loader,
    caption_table,
    clean_caption,
    decode_image,
    image_folder,
    label_table,
    summarize_bad_samples,
)
from florence.data.errors import DataFileError

PREPROCESS = dict(input_size=[3, 32, 32], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], interpolation="bicubic",
                  crop_pct=1.0)


def byte_tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """A tiny deterministic tokenizer: UTF-8 bytes + 1, padded/truncated to 24."""
    ids = torch.zeros(len(texts), 24, dtype=torch.int64)
    for i, t in enumerate(texts):
        b = [c + 1 for c in t.encode("utf-8")[:24]]
        ids[i, : len(b)] = torch.tensor(b)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def photo(name: str = "astronaut", size: int = 48) -> Image.Image:
    img = Image.fromarray(getattr(skdata, name)())
    return img.convert("RGB").resize((size, size))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


# --- decoding each kind of image --------------------------------------------------------------------------------


def test_missing_unreadable_truncated_empty(tmp_path):
    good = jpeg_bytes(photo())
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    png = io.BytesIO()
    photo().save(png, format="PNG")
    broken_png = bytearray(png.getvalue())
    broken_png[100] ^= 0xFF  # flips a byte inside the image data: the CRC check fails
    (tmp_path / "crc.png").write_bytes(bytes(broken_png))
    cases = {"missing.jpg": "missing file", "trunc.jpg": "corrupt or truncated image",
             "junk.jpg": "not a recognised image format", "empty.png": "empty file",
             "crc.png": "corrupt or truncated image"}
    for fname, reason in cases.items():
        with pytest.raises(BadSample) as info:
            decode_image(tmp_path / fname)
        assert info.value.file == str(tmp_path / fname)
        assert info.value.reason.startswith(reason), (fname, info.value.reason)


def test_modes_become_rgb(tmp_path):
    rgb = np.asarray(photo())
    gray = Image.fromarray(rgb).convert("L")
    out = decode_image(_png(gray))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out)[..., 0], np.asarray(out)[..., 2])
    assert np.array_equal(np.asarray(out)[..., 1], np.asarray(gray))

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (200, 10, 10, 255)  # opaque red top half, fully transparent (black) bottom half
    out = np.asarray(decode_image(_png(Image.fromarray(rgba))))
    assert out.shape == (8, 8, 3) and (out[:4] == (200, 10, 10)).all() and (out[4:] == 255).all()

    la = Image.new("LA", (4, 4), (0, 0))
    assert (np.asarray(decode_image(_png(la))) == 255).all()  # transparent black on white -> white

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    assert decode_image(_png(pal)).mode == "RGB"

    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = np.asarray(decode_image(jpeg_bytes(cmyk, quality=95)), dtype=np.float64)
    assert out.shape == rgb.shape and np.abs(out - rgb).mean() < 12  # lossy JPEG round trip

    deep = np.array([[0, 257 * 100], [65535, 257 * 255]], dtype=np.uint16)
    out = np.asarray(decode_image(_png(Image.fromarray(deep))))
    assert out[..., 0].tolist() == [[0, 100], [255, 255]]  # scaled from 16 bits, not clipped

    as_int32 = Image.fromarray(deep.astype(np.int32))
    assert np.asarray(decode_image(_tiff(as_int32)))[..., 0].tolist() == [[0, 100], [255, 255]]


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red marker in the top-left corner of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(jpeg_bytes(img, exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[2, 17, 0] > 200 and arr[2, 17, 2] < 60  # the marker is now top-right
    assert arr[2, 2, 2] > 200  # top-left is blue


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


# --- captions ---------------------------------------------------------------------------------------------------


def test_captions():
    assert clean_caption("  a  red\n\tmotorcycle ", name="x") == "a red motorcycle"
    assert clean_caption("caf\u00e9 au lait".encode("utf-8"), name="x") == "caf\u00e9 au lait"
    for bad, reason in [("", "empty"), ("  \n\t ", "empty"), (b"caf\xe9", "caption is not valid UTF-8"),
                        (None, "caption is not text")]:
        with pytest.raises(BadSample) as info:
            clean_caption(bad, name="row 7")
        assert info.value.file == "row 7" and info.value.reason.startswith(reason)


# --- the policy through the loader -----------------------------------------------------------------------------


@pytest.fixture
def messy_captions(tmp_path):
    """A caption CSV with 4 good rows and one row per kind of bad input; returns (csv path, bad files)."""
    good = jpeg_bytes(photo("coffee"))
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"]):
        photo(name).save(tmp_path / f"good{i}.png")
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "junk.png").write_bytes(b"\x00" * 300)
    photo("camera").save(tmp_path / "ok_for_captions.png")
    rows = [("good0.png", "a portrait of an astronaut"), ("good1.png", "a facial photo of a tabby cat"),
            ("good2.png", "a cup of coffee on a saucer"), ("good3.png", "a rocket standing on a launchpad"),
            ("missing.png", "a photo that does not exist"), ("trunc.jpg", "a truncated photo"),
            ("junk.png", "bytes that are no image"), ("ok_for_captions.png", "   "),
            ("ok_for_captions.png", "")]
    path = tmp_path / "captions.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    with path.open("ab") as f:  # a row whose caption is not UTF-8 (Latin-1 bytes)
        f.write(b"ok_for_captions.png,caf\xe9 cr\xe8me\r\n")
    bad = {str(tmp_path / "missing.png"): "missing file", str(tmp_path / "trunc.jpg"): "corrupt or truncated image",
           str(tmp_path / "junk.png"): "not a recognised image format"}
    return path, bad


def _loader(path, run_dir, policy="skip", num_workers=0, batch_size=5):
    cfg = {"sources": [{"type": "caption_table", "path": str(path)}], "batch_size": batch_size,
           "num_workers": num_workers, "seed": 3, "on_bad_sample": policy}
    return build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize, run_dir=run_dir)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_counts_and_logs(messy_captions, tmp_path, num_workers):
    path, bad = messy_captions
    run_dir = tmp_path / f"run{num_workers}"
    loader = _loader(path, run_dir, num_workers=num_workers)
    seen = set()
    for _, batch in zip(range(6), loader):  # 30 samples: 3 passes over the 10 rows
        assert batch["images"].shape == (5, 3, 32, 32)  # bad samples are replaced: batches keep their size
        assert batch["labels"].dtype == torch.int64
        seen.update(batch["labels"].tolist())
    assert len(seen) == 4  # only the 4 good captions reach the model
    records = [json.loads(line) for line in (run_dir / "bad_samples.jsonl").read_text().splitlines()]
    logged = {r["file"]: r["reason"] for r in records}
    for file, reason in bad.items():
        assert logged[file].startswith(reason)
    reasons = {r["reason"].split(" (")[0] for r in records}
    assert {"empty or whitespace-only caption", "caption is not valid UTF-8"} <= reasons
    assert all(r["source"] == "captions" and r["rank"] == 0 for r in records)
    if num_workers:
        assert {r["worker"] for r in records} <= {0, 1} and None not in {r["worker"] for r in records}
    summary = loader.bad_sample_summary()
    assert summary == summarize_bad_samples(run_dir)
    assert summary.total == len(records) >= 6
    assert summary.by_reason["missing file"] >= 1 and summary.by_reason["empty or whitespace-only caption"] >= 1
    assert "bad samples skipped" in summary.format() and "missing file" in summary.format()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_raise_names_the_file(messy_captions, tmp_path, num_workers):
    path, _ = messy_captions
    loader = _loader(path, tmp_path / "run", policy="raise", num_workers=num_workers, batch_size=10)
    with pytest.raises(BadSampleError) as info:
        next(iter(loader))
    assert str(tmp_path) in str(info.value)
    assert not (tmp_path / "run" / "bad_samples.jsonl").exists()


def test_image_folder_with_bad_files(tmp_path):
    for cls, name in [("cat", "chelsea"), ("coffee", "coffee")]:
        (tmp_path / cls).mkdir()
        for i in range(3):
            photo(name, 40 + i).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "zz_broken.jpg").write_bytes(jpeg_bytes(photo())[:200])
    (tmp_path / "coffee" / "gray16.png").write_bytes(_png(Image.fromarray(np.full((30, 30), 40000, np.uint16))))
    source = image_folder(tmp_path)
    assert source.class_names == ["cat", "coffee"] and len(source) == 8
    cfg = {"sources": [{"type": "image_folder", "path": str(tmp_path)}], "batch_size": 8, "seed": 0}
    batch = next(iter(build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize,
                                         run_dir=tmp_path / "run")))
    assert batch["images"].shape == (8, 3, 32, 32) and torch.isfinite(batch["images"]).all()
    summary = summarize_bad_samples(tmp_path / "run")
    assert summary.by_reason == {"corrupt or truncated image": summary.total} and summary.total >= 1


def test_bad_jsonl_rows(tmp_path):
    photo().save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": "an astronaut"}).encode(), b"{not json",
             json.dumps({"image": "a.png", "caption": 5}).encode(), b'{"image": "a.png", "caption": "caf\xe9"}']
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    source = caption_table(tmp_path / "c.jsonl")
    assert len(source) == 4
    import random

    assert source.get(0, random.Random(0)).text == "an astronaut"
    reasons = []
    for i in (1, 2, 3):
        with pytest.raises(BadSample) as info:
            source.get(i, random.Random(0))
        assert f"c.jsonl:{i + 1}" in info.value.file
        reasons.append(info.value.reason)
    assert reasons[0].startswith("invalid JSON") and reasons[1].startswith("caption is not text")
    assert reasons[2].startswith("line is not valid UTF-8")


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_a_row_with_more_fields_than_the_header_is_an_error_naming_the_line(tmp_path, suffix, sep):
    """An unquoted delimiter inside a caption must not cut the caption silently (csv.DictReader would drop the
    rest): caption and label tables refuse the file, naming it and the line; a quoted field is fine."""
    captions = tmp_path / f"captions{suffix}"
    captions.write_text(f"image{sep}caption\na.png{sep}\"a dog{sep} running\"\nb.png{sep}a cat{sep} sleeping\n")
    with pytest.raises(DataFileError, match=rf"captions\{suffix}:3: 3 fields but the header has 2"):
        caption_table(captions)
    labels = tmp_path / f"labels{suffix}"
    labels.write_text(f"image{sep}label\na.png{sep}dog\nb.png{sep}cat{sep}extra\nc.png{sep}dog\n")
    with pytest.raises(DataFileError, match=rf"labels\{suffix}:3:"):
        label_table(labels)
    captions.write_text(f"image{sep}caption\na.png{sep}\"a dog{sep} running\"\n")
    assert caption_table(captions).items[0][1] == f"a dog{sep} running"


def test_too_many_bad_in_a_row(tmp_path):
    (tmp_path / "only").mkdir()
    for i in range(3):
        (tmp_path / "only" / f"{i}.jpg").write_bytes(b"junk")
    cfg = {"sources": [{"type": "image_folder", "path": str(tmp_path)}], "batch_size": 2, "max_bad_retries": 2}
    with pytest.raises(BadSampleError, match="3 bad samples in a row"):
        next(iter(build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize)))


def test_ranks_log_to_own_files_and_summary_merges(messy_captions, tmp_path):
    path, bad = messy_captions
    run_dir = tmp_path / "multi"
    for rank in range(2):
        cfg = {"sources": [{"type": "caption_table", "path": str(path)}], "batch_size": 5, "seed": 3}
        loader = build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize, rank=rank, world_size=2,
                                    run_dir=run_dir)
        for _ in zip(range(2), loader):
            pass
    per_rank = [len((run_dir / name).read_text().splitlines())
                for name in ("bad_samples.jsonl", "bad_samples.rank1.jsonl")]
    assert all(n > 0 for n in per_rank)
    assert summarize_bad_samples(run_dir).total == sum(per_rank)

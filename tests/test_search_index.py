"""Indexing into Milvus Lite: incremental runs, kill safety, sharded ranks, provenance, lock errors, and embeddings
equal to an independent computation (module ``florence.search``)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import florence
from florence.benchmarks.moving_fmnist import encode_video
from florence.data.sources import read_idx
from florence.data.transforms import build_transform
from florence.search import DatabaseLocked, Index, ModelMismatch, SearchError, Store, walk_source
from florence.search.cli import index_main, search_main
from florence.search.store import row_id

FMNIST = Path("/usr/share/datasets/fashion-mnist")
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
pytestmark = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST (Debian dataset-fashion-mnist) is not installed")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def material(tmp_path_factory, tiny_dual_encoder):
    """240 real Fashion-MNIST test images as PNGs (in two folders), their labels, and two tiny dual encoders."""
    root = tmp_path_factory.mktemp("search")
    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:240]
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:240]
    pictures = root / "pictures"
    for i, image in enumerate(images):
        folder = pictures / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    prompts = [f"a photo of a {n}" for n in NAMES] * 3
    return {"root": root, "pictures": pictures, "images": images, "labels": labels,
            "bundle": tiny_dual_encoder(prompts, seed=0), "other": tiny_dual_encoder(prompts, seed=1)}


def _copy_pictures(material, tmp_path, count=None) -> Path:
    folder = tmp_path / "pictures"
    shutil.copytree(material["pictures"], folder)
    if count is not None:
        for path in sorted(folder.rglob("*.png"))[count:]:
            path.unlink()
    return folder


def _rows(db, collection="c"):
    with Store(db, collection) as store:
        return list(store.rows())


def test_add_is_incremental_and_replaces_changed_files(material, tmp_path):
    folder = _copy_pictures(material, tmp_path, count=30)
    (folder / "bad.png").write_bytes(b"not an image")
    db = tmp_path / "s.db"
    with Index(db, "c", model=material["bundle"]) as index:
        first = index.add(folder, progress=False, workers=0)
        assert (first.indexed, first.unchanged, first.updated) == (30, 0, 0)
        assert first.skipped == [(str(folder / "bad.png"), "not a recognised image format")]
        again = index.add(folder, progress=False, workers=0)
        assert (again.indexed, again.unchanged, again.updated) == (0, 30, 0)
        # new content at one path: a new id replaces the old row; a touched file keeps its row
        changed, touched = sorted(folder.rglob("*.png"))[:2]
        Image.fromarray(255 - material["images"][0]).save(changed)
        os.utime(touched, (time.time() + 100, time.time() + 100))
        third = index.add(folder, progress=False, workers=0)
        assert (third.indexed, third.unchanged, third.updated) == (0, 30 - 1, 1)
        rows = _rows_of(index)
        assert len(rows) == 30 and len({r["path"] for r in rows}) == 30
        by_path = {r["path"]: r for r in rows}
        digest = __import__("hashlib").sha256(changed.read_bytes()).hexdigest()
        assert by_path[str(changed)]["id"] == row_id(digest, str(changed)) and by_path[str(changed)]["content_hash"] == digest
        assert by_path[str(touched)]["mtime"] == pytest.approx(touched.stat().st_mtime)
        # a removed file stays until --prune
        sorted(folder.rglob("*.png"))[2].unlink()
        assert index.add(folder, progress=False, workers=0).pruned == 0 and index.count() == 30
        assert index.add(folder, progress=False, workers=0, prune=True).pruned == 1 and index.count() == 29


def _rows_of(index):
    return list(index.store.rows())


def test_embeddings_equal_an_independent_computation(material, tmp_path):
    """Stored vectors = the bundle's eval transform (resize/crop/normalise) + encode_image on the PIL image."""
    folder = _copy_pictures(material, tmp_path, count=12)
    with Index(tmp_path / "s.db", "c", model=material["bundle"]) as index:
        index.add(folder, progress=False, workers=2, batch_size=5)
        rows = {r["path"]: r for r in index.store.rows(("path", "vector", "kind"))}
    model = florence.from_pretrained(material["bundle"])
    transform = build_transform(dict(model.preprocess), train=False)
    paths = sorted(folder.rglob("*.png"))
    with torch.no_grad():
        expected = model.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    stored = np.stack([rows[str(p)]["vector"] for p in paths])
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5)
    assert {r["kind"] for r in rows.values()} == {"image"}


def test_videos_are_mean_pooled_frames(material, tmp_path):
    """A 16-frame clip of a Fashion-MNIST item sliding right: 4 frames (centres 2, 6, 10, 14) decoded by a plain
    PyAV loop, embedded, unit-averaged and renormalised."""
    folder = tmp_path / "videos"
    folder.mkdir()
    item = np.repeat(material["images"][1][:, :, None], 3, axis=2)
    clip = np.zeros((16, 32, 48, 3), np.uint8)
    for t in range(16):
        clip[t, 2:30, t:t + 28] = item
    (folder / "clip.mp4").write_bytes(encode_video(clip))
    with Index(tmp_path / "s.db", "c", model=material["bundle"]) as index:
        summary = index.add(folder, progress=False, workers=0, frames=4)
        assert summary.indexed == 1 and index.store.info().frames == 4
        (row,) = index.store.rows(("vector", "kind"))
    model = florence.from_pretrained(material["bundle"])
    transform = build_transform(dict(model.preprocess), train=False)
    with av.open(str(folder / "clip.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with torch.no_grad():
        unit = model.encode_image(torch.stack([transform(Image.fromarray(frames[i])) for i in (2, 6, 10, 14)]))
    expected = torch.nn.functional.normalize(unit.mean(0), dim=0).numpy()
    assert row["kind"] == "video"
    np.testing.assert_allclose(row["vector"], expected, atol=1e-5)


def test_csv_metadata_filters_and_search(material, tmp_path):
    folder = _copy_pictures(material, tmp_path, count=60)
    paths = sorted(folder.rglob("*.png"))
    table = tmp_path / "items.csv"
    lines = ["path,label,number"] + [f"{p.relative_to(tmp_path)},{NAMES[material['labels'][int(p.stem)]]},{int(p.stem)}"
                                     for p in paths] + ["pictures/missing.png,Bag,1"]
    table.write_text("\n".join(lines) + "\n")
    with Index(tmp_path / "s.db", "c", model=material["bundle"]) as index:
        summary = index.add(table, progress=False, workers=0)
        assert summary.indexed == 60
        assert summary.skipped == [(f"{table}:62 {tmp_path / 'pictures' / 'missing.png'}", "missing file")]
        bags = index.search(text="a photo of a Bag", top_k=100, filter='label == "Bag"')
        assert bags and all(h.fields["label"] == "Bag" for h in bags)
        assert len(bags) == sum(NAMES[material["labels"][int(p.stem)]] == "Bag" for p in paths)
        few = index.search(text="anything", top_k=100, filter="number < 10")
        assert sorted(h.fields["number"] for h in few) == [n for n in range(10) if any(int(p.stem) == n for p in paths)]
        # an indexed image finds itself first; like=ID reproduces it; text+image mixes
        query = paths[7]
        hits = index.search(image=query, top_k=3)
        assert hits[0].path == str(query) and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.id for h in index.search(like=hits[0].id, top_k=3)] == [h.id for h in hits]
        text_only = index.query_vector(text="a photo of a Bag")
        image_only = index.query_vector(image=query)
        mixed = index.query_vector(text="a photo of a Bag", image=query, text_weight=0.25)
        expected = 0.25 * text_only + 0.75 * image_only
        np.testing.assert_allclose(mixed, expected / np.linalg.norm(expected), atol=1e-6)
        with pytest.raises(SearchError, match="filter 'labl =="):
            index.search(text="x", filter='labl == "Bag" and')


def test_webdataset_shards(material, tmp_path):
    shard = tmp_path / "shard-0000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(5):
            png = tmp_path / f"{i}.png"
            Image.fromarray(material["images"][i]).save(png)
            tar.add(png, arcname=f"s{i}.png")
            meta = tmp_path / f"{i}.json"
            meta.write_text(json.dumps({"label": NAMES[material["labels"][i]], "size": 3}))
            tar.add(meta, arcname=f"s{i}.json")
    files = walk_source(shard)
    assert [item.path for item in files.items] == [f"{shard}#s{i}.png" for i in range(5)]
    with Index(tmp_path / "s.db", "c", model=material["bundle"]) as index:
        assert index.add(files, progress=False, workers=0).indexed == 5
        rows = {r["path"]: r for r in index.store.rows(("path", "label", "size"))}
    assert rows[f"{shard}#s1.png"]["label"] == NAMES[material["labels"][1]]
    assert rows[f"{shard}#s1.png"]["size"] != 3  # a metadata key may not overwrite a schema field


def test_another_model_is_refused(material, tmp_path):
    folder = _copy_pictures(material, tmp_path, count=4)
    with Index(tmp_path / "s.db", "c", model=material["bundle"]) as index:
        index.add(folder, progress=False, workers=0)
    with Index(tmp_path / "s.db", "c", model=material["other"]) as index:
        with pytest.raises(ModelMismatch, match="was embedded with model"):
            index.search(text="a bag")
        with pytest.raises(ModelMismatch):
            index.add(folder, progress=False, workers=0)
        assert index.search(like=next(index.store.rows(("id",)))["id"], top_k=1)  # a stored vector needs no model


def test_a_held_lite_path_names_its_holder(material, tmp_path):
    db = tmp_path / "s.db"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from florence.search import Store; "
                               f"s = Store({str(db)!r}, 'c'); print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(DatabaseLocked, match=f"held by process {holder.pid} .*florence serve"):
            Store(db, "c")
    finally:
        holder.kill()
        holder.wait()
    Store(db, "c").close()  # free again once the holder is gone
    # a closed Store frees the path for other processes (the embedded server stops with the last Store)
    first, second = Store(db, "c"), Store(db, "c")
    first.close()
    opener = [sys.executable, "-c", f"from florence.search import Store; Store({str(db)!r}, 'c').close()"]
    held = subprocess.run(opener, capture_output=True, text=True, env=ENV)
    assert held.returncode != 0 and "Traceback" in held.stderr and "DatabaseLocked" in held.stderr
    assert "Failed to start MilvusLite" not in held.stderr  # milvus-lite's own traceback is not shown
    second.close()
    second.close()
    assert subprocess.run(opener, capture_output=True, text=True, env=ENV).returncode == 0


def test_cli_one_line_errors(material, tmp_path, capsys):
    assert search_main(["--db", str(tmp_path / "s.db"), "--collection", "nope", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no collection 'nope'" in err
    assert index_main(["--db", str(tmp_path / "x.sqlite"), "--collection", "c", "--model", str(material["bundle"]),
                       "--source", str(tmp_path)]) == 2
    assert "must end in .db" in capsys.readouterr().err


def test_cli_search_table_json_and_contact_sheet(material, tmp_path, capsys):
    folder = _copy_pictures(material, tmp_path, count=20)
    db = str(tmp_path / "s.db")
    assert index_main(["--db", db, "--collection", "c", "--model", str(material["bundle"]), "--source", str(folder),
                       "--workers", "0", "--no-progress"]) == 0
    assert "indexed 20, unchanged 0" in capsys.readouterr().out
    # --model left out: the bundle recorded at indexing is used
    assert search_main(["--db", db, "--collection", "c", "a photo of a Bag", "--top-k", "3", "--json",
                        "--html", str(tmp_path / "sheet.html")]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    sheet = (tmp_path / "sheet.html").read_text()
    assert sheet.count("data:image/png;base64,") == 3 and Path(hits[0]["path"]).name in sheet


def _index_cmd(material, folder, db, batch=4):
    return [sys.executable, "-m", "florence", "index", "--db", str(db), "--collection", "c", "--model",
            str(material["bundle"]), "--source", str(folder), "--batch-size", str(batch), "--workers", "0"]


@pytest.mark.slow
def test_a_killed_run_rerun_ends_with_one_row_per_file(material, tmp_path):
    """SIGKILL `florence index` twice mid-run (after some batches were written), re-run: exactly one row per file,
    every row's id matching its file's content."""
    folder = _copy_pictures(material, tmp_path)
    db = tmp_path / "s.db"
    files = sorted(str(p) for p in folder.rglob("*.png"))
    for kill_after in (40, 120):
        proc = subprocess.Popen(_index_cmd(material, folder, db), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                env=ENV, text=True)
        progress, buffer = 0, ""
        while progress < kill_after:
            ch = proc.stderr.read(1)
            assert ch, f"index finished before {kill_after} files: {buffer[-500:]}"
            buffer += ch
            if ch == "\r" or ch == "\n":
                line = buffer.rsplit("\r", 2)[-2] if buffer.count("\r") >= 2 else buffer
                if "file" in line and "|" in line:
                    try:
                        progress = int(line.split("|")[-1].strip().split("/")[0])
                    except ValueError:
                        pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(_index_cmd(material, folder, db), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _rows(db)
    assert sorted(r["path"] for r in rows) == files
    assert all(r["id"] == row_id(r["content_hash"], r["path"]) for r in rows)
    assert "unchanged 0" not in done.stdout  # the killed runs had written rows that this run kept


@pytest.mark.slow
def test_torchrun_shards_across_two_gloo_ranks(material, tmp_path):
    folder = _copy_pictures(material, tmp_path, count=50)
    db = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "florence", "index", "--db", str(db), "--collection", "c", "--model", str(material["bundle"]), "--source",
           str(folder), "--batch-size", "8", "--workers", "0", "--no-progress", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["indexed"] == 50
    rows = _rows(db)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.rglob("*.png"))
    # a failure on rank 0 (another model) stops every rank with the one-line error, nobody waits forever
    other = [str(material["other"]) if part == str(material["bundle"]) else part for part in cmd]
    failed = subprocess.run(other, capture_output=True, text=True, env=ENV, timeout=300)
    assert failed.returncode != 0 and "was embedded with model" in failed.stderr
    # the same vectors as one process computes
    with Index(tmp_path / "one.db", "c", model=material["bundle"]) as index:
        index.add(folder, progress=False, workers=0)
        single = {r["path"]: r["vector"] for r in index.store.rows(("path", "vector"))}
    with Store(db, "c") as store:
        for row in store.rows(("path", "vector")):
            np.testing.assert_allclose(row["vector"], single[row["path"]], atol=1e-5)

"""``benchmarks/fmnist_files.py`` writes Fashion-MNIST as PNG files and a table, idempotently; ``benchmarks/perf/
search.py`` runs end to end at a tiny size (a fresh ``unicl_test`` bundle, 40 PNGs, 500 synthetic vectors, 4 clients
for 2 s) and reports every figure it promises, consistently (no wall-clock thresholds); its load test counts errors."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel

from florence.benchmarks import fmnist_files
from florence.benchmarks.fmnist_files import CSV_NAME, class_slug, write_fashion_mnist_files
from florence.benchmarks.perf import search
from florence.data.sources import FASHION_MNIST_CLASSES, read_idx

pytestmark = pytest.mark.usefixtures("one_thread_module")



def _table(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_fmnist_files_writes_pngs_and_table_idempotently(fake_fmnist, tmp_path):
    out = tmp_path / "files"
    table = write_fashion_mnist_files(out, limit=12, root=fake_fmnist)
    assert table == out / CSV_NAME
    rows = _table(table)
    assert [r["split"] for r in rows] == ["train"] * 12 + ["test"] * 12
    images = {"train": read_idx(fake_fmnist / "train-images-idx3-ubyte.gz"),
              "test": read_idx(fake_fmnist / "t10k-images-idx3-ubyte.gz")}
    for r in rows:
        index = int(r["index"])
        label = FASHION_MNIST_CLASSES[index % 10]  # the fixture's labels are 0..9 in turn
        assert r["label"] == label
        assert r["path"] == f"{r['split']}/{class_slug(label)}/{r['split']}_{index:05d}.png"
        assert np.array_equal(np.asarray(Image.open(out / r["path"])), images[r["split"]][index])
    assert class_slug("T-shirt/top") == "t_shirt_top" and class_slug("Ankle boot") == "ankle_boot"

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    (out / rows[3]["path"]).unlink()  # a killed run: one file missing
    write_fashion_mnist_files(out, limit=12, root=fake_fmnist)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert set(after) == set(stamps)  # restored, and no temporary files left
    changed = [p for p in after if after[p] != stamps[p]]
    assert changed == [out / rows[3]["path"]]  # nothing else rewritten (the table neither)
    write_fashion_mnist_files(out, splits=["test"], limit=2, root=fake_fmnist)
    assert [(r["split"], r["index"]) for r in _table(table)] == [("test", "0"), ("test", "1")]

    with pytest.raises(fmnist_files.FilesError, match="splits"):
        write_fashion_mnist_files(out, splits=["val"], root=fake_fmnist)
    assert fmnist_files.main([str(out), "--root", str(tmp_path / "nowhere")]) == 2  # one line, no traceback


@pytest.fixture(scope="module")
def tiny_bundle(tiny_dual_encoder):
    return tiny_dual_encoder([t.format(c) for c in FASHION_MNIST_CLASSES for t in search.TEMPLATES])


def test_search_script_reports_stages_latency_recall_variants_and_load(fake_fmnist, tiny_bundle, tmp_path, capsys):
    table = write_fashion_mnist_files(tmp_path / "files", limit=20, root=fake_fmnist)  # 40 PNGs
    out = tmp_path / "perf.json"
    load = ["--load-clients", "4", "--load-seconds", "2"]
    result = search.main(["--device", "cpu", "--threads", "1", "--model", str(tiny_bundle), "--files", str(table),
                          "--batch-size", "8", "--workers", "1", "--stage-rounds", "2", "--queries", "3",
                          "--recall-queries", "10", "--rate-images", "16", "--rate-rounds", "1", "--synthetic", "500",
                          "--variants", "fp32", "bf16", *load, "--work-dir", str(tmp_path), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "1. indexing stages" in stdout and "2. single-query latency" in stdout and "3. embedding path" in stdout
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert not any(p.suffix == ".db" for p in tmp_path.rglob("*")), "the work folder is removed"

    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["decode", "embed", "insert", "end to end"]
    for s in stages.values():
        assert s["images"] == 40 and s["images_per_s"] == pytest.approx(s["images"] / s["seconds"])
    slowest = min(("decode", "embed", "insert"), key=lambda n: stages[n]["images_per_s"])
    assert result["slowest_stage"] == slowest
    assert result["end_to_end_over_slowest_overall"] == pytest.approx(stages["end to end"]["images_per_s"]
                                                                      / stages[slowest]["images_per_s"])
    rounds = result["rounds"]
    assert [r["images"] for r in rounds] == [20, 20]
    for r in rounds:  # per round: e2e images/s over the slowest stage's = the slowest stage's seconds over e2e's
        assert r["ratio"] == pytest.approx(max(r["decode"], r["embed"], r["insert"]) / r["end to end"])
    assert result["end_to_end_over_slowest"] == pytest.approx(np.median([r["ratio"] for r in rounds]))
    for s, stage in zip(stages.values(), stages):
        assert s["seconds"] == pytest.approx(sum(r[stage] for r in rounds))
    assert [x["indexed"] for x in result["end_to_end_summaries"]] == [20, 20]
    assert not any(x["skipped"] for x in result["end_to_end_summaries"])

    latency = [(r["collection"], r["index_type"], r["rows"]) for r in result["latency"]]
    assert latency == [("real (as indexed)", "FLAT", 40), ("real", "FLAT", 40), ("real", "HNSW", 40),
                       ("synthetic", "FLAT", 500), ("synthetic", "HNSW", 500)]
    for r in result["latency"]:
        for kind in ("text", "image", "db"):
            assert 0 < r[kind]["p50"] <= r[kind]["p95"]
    # Milvus FLAT is exact: it must agree with numpy's exact search; HNSW on 40 rows finds the same
    assert result["recall"]["FLAT vs numpy"] == 1.0
    assert result["recall"]["HNSW vs FLAT"] >= 0.95
    assert result["recall_queries"] == 50 + 10  # 10 labels x 5 templates + the image queries

    variants = {r["variant"]: r for r in result["embedding"]}
    assert list(variants) == ["fp32", "bf16"]
    assert variants["fp32"]["same_top10"] == 1.0 and variants["fp32"]["speedup"] == 1.0
    assert 0.0 <= variants["bf16"]["same_top10"] <= variants["bf16"]["overlap_at10"] <= 1.0
    assert variants["bf16"]["overlap_at10"] > 0.5  # bf16 embeddings of a random model still mostly agree
    for r in variants.values():
        assert r["images"] == 40 and r["rate_images"] == 16 and r["images_per_s"] > 0
    assert set(result["load_average"]) >= {"start", "after stages", "after latency", "after embedding"}

    assert "4. load test" in stdout
    load = result["load"]
    assert load["errors"] == 0, load["error_samples"]
    assert load["requests"] > 0 and load["by_kind"]["text"]["requests"] > 0
    assert load["by_kind"]["image"]["requests"] > 0
    assert 0 < load["latency_ms"]["p50"] <= load["latency_ms"]["p99"]


class _Body(BaseModel):
    text: str
    top_k: int


def test_load_test_counts_errors_and_sends_both_kinds():
    """Against a stub app that fails every text query containing "bad": the failures are counted as errors, the rest
    (text and multipart image queries) answered."""
    app = FastAPI()
    seen = {"image_bytes": 0}

    @app.post("/api/search")
    def text_search(body: _Body):
        if "bad" in body.text:
            return JSONResponse({"error": "bad query"}, status_code=400)
        return {"hits": [], "top_k": body.top_k}

    @app.post("/api/search/image")
    def image_search(image: UploadFile = File(...), top_k: int = Form(10)):
        seen["image_bytes"] = len(image.file.read())
        return {"hits": []}

    result = search.run_load_test(app, ["good", "bad"], [("a.png", b"x" * 100)], clients=2, seconds=1.0, top_k=5)
    assert result["errors"] > 0 and all("HTTP 400" in e for e in result["error_samples"])
    assert result["by_kind"]["image"]["requests"] > 0 and result["by_kind"]["text"]["requests"] > 0
    assert result["requests"] == result["errors"] + sum(v["requests"] for v in result["by_kind"].values())
    assert seen["image_bytes"] == 100  # the fork shares nothing back: this checks the server side, in this process

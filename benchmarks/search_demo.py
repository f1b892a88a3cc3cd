"""``florence demo search``: Fashion-MNIST search on Milvus Lite end to end, with the demo's dual encoder.

1. the demo's UniCL bundle (``--backbone``, default ``runs/demo/pretrain/final``; pre-trained first when absent);
2. the 70,000 Fashion-MNIST images written as PNGs with a ``path,label,split,index`` table
   (:mod:`florence.benchmarks.fmnist_files`);
3. ``florence index`` of the table into ``WORKDIR/search.db`` (collection ``fashion_mnist``; the ``label`` column
   becomes a metadata field; a re-run finds every file unchanged);
4. text search for each class with ``"a photo of a {class}"`` (the class name as written: the demo model's byte-level
   BPE vocabulary was trained on its prompts and is case-sensitive): **precision@10**, the share of the ten results
   whose ``label`` is the class, averaged over the 10 classes (goal >= 0.9); a contact sheet per class;
5. image search: ``--image-queries`` test images (equal per class, seeded) as queries, the ten best other rows:
   **same-class precision@10** (goal >= 0.85);
6. tagging: zero-shot alone (80-template prompt ensemble) vs a kNN vote among 1% / 10% of the rows given their label
   as trusted tags, each scored on the same rows (those untrusted in every setting); then the 10% kNN tags are written
   into the collection (goal: kNN with 10% beats zero-shot alone);
7. duplicates, in a second collection (``fashion_mnist_dup``): the first 2,000 test images plus 20 planted exact copies
   and 20 planted near copies (re-encoded as JPEG, quality 75); for thresholds 0.95 / 0.99 / 0.995: the groups found,
   the largest group, and how many planted pairs share a group (on the full collection, the 32-d demo embedding puts
   most items of a class above 0.95 to some neighbour, so near-duplicate groups chain through everything there);
8. ``WORKDIR/results/search.json`` with every figure and a summary table on stdout.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from florence.benchmarks.demo_steps import Steps, ensure_unicl_bundle
from florence.benchmarks.fmnist_files import write_fashion_mnist_files
from florence.data.sources import FASHION_MNIST_CLASSES
from florence.errors import FlorenceError
from florence.search.contact_sheet import write_contact_sheet
from florence.search.dedup import find_duplicates, write_duplicates_json
from florence.search.index import Index
from florence.search.tagging import predict_tags, read_field, tag_accuracy, write_tags

COLLECTION = "fashion_mnist"
GOALS = {"text_precision@10": 0.9, "image_precision@10": 0.85}


def text_queries(index: Index, sheets: Path | None) -> dict[str, float]:
    """Precision@10 of ``"a photo of a {class}"`` per class (module docstring, step 4)."""
    queries = [f"a photo of a {name}" for name in FASHION_MNIST_CLASSES]
    per_class = {}
    for name, query, hits in zip(FASHION_MNIST_CLASSES, queries, index.search_texts(queries, top_k=10)):
        per_class[name] = float(np.mean([h.fields.get("label") == name for h in hits]))
        if sheets is not None:
            write_contact_sheet(hits, sheets / f"text_{name.replace('/', '_').replace(' ', '_')}.html", repr(query))
    return per_class


def image_queries(index: Index, count: int, seed: int) -> dict[str, float]:
    """Same-class precision@10 of ``count`` test images as queries, themselves left out (step 5)."""
    rng = np.random.default_rng(seed)
    per_class_count = max(1, count // len(FASHION_MNIST_CLASSES))
    chosen = []
    for name in FASHION_MNIST_CLASSES:
        rows = [r for r in index.store.rows(("id", "vector", "label"), f'split == "test" and label == "{name}"')]
        picks = rng.choice(len(rows), size=min(per_class_count, len(rows)), replace=False)
        chosen += [rows[i] for i in sorted(picks)]
    vectors = np.asarray([r["vector"] for r in chosen], np.float32)
    per_class: dict[str, list[float]] = {name: [] for name in FASHION_MNIST_CLASSES}
    for start in range(0, len(chosen), 100):
        results = index.store.search(vectors[start:start + 100], top_k=11, output_fields=("label",))
        for row, hits in zip(chosen[start:start + 100], results):
            others = [h for h in hits if h.id != row["id"]][:10]
            per_class[row["label"]].append(float(np.mean([h.fields.get("label") == row["label"] for h in others])))
    return {name: float(np.mean(v)) for name, v in per_class.items() if v}


def tagging(index: Index, seed: int) -> dict[str, dict]:
    """Zero-shot vs kNN with 1% / 10% trusted rows, on the rows untrusted in all settings; writes the 10% tags."""
    vectors = index.store.vectors()
    truth = read_field(index.store, "label")
    ids = sorted(truth)
    order = np.random.default_rng(seed).permutation(len(ids))
    trusted_sets = {share: {ids[i]: truth[ids[i]] for i in order[:round(share * len(ids))]} for share in (0.01, 0.1)}
    scored = [ids[i] for i in order[round(0.1 * len(ids)):]]  # untrusted in every setting
    labels = list(FASHION_MNIST_CLASSES)
    results, predictions = {}, {}
    predictions["zeroshot"] = predict_tags(index, labels, method="zeroshot", vectors=vectors)
    for share, trusted in trusted_sets.items():
        predictions[f"knn_{share:.0%}"] = predict_tags(index, labels, method="knn", trusted=trusted, vectors=vectors)
    for name, prediction in predictions.items():
        results[name] = tag_accuracy(prediction, truth, ids=scored, threshold=0.5)
    summary = write_tags(index.store, predictions["knn_10%"], threshold=0.5, overwrite=True)
    results["written"] = summary.to_dict()
    return results


def plant_duplicates(table: Path, out: Path, seed: int, count: int = 20, base: int = 2000) -> Path:
    """A CSV of the first ``base`` test images plus ``count`` exact copies (same bytes) and ``count`` near copies
    (JPEG, quality 75) of random ones among them; column ``copy_of`` names the original."""
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"][:base]
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    picks = np.random.default_rng(seed).choice(len(rows), size=2 * count, replace=False)
    lines = ["path,label,copy_of"] + [f"{table.parent / r['path']},{r['label']}," for r in rows]
    for n, pick in enumerate(picks):
        original = table.parent / rows[pick]["path"]
        if n < count:
            copy = out / f"exact_{n:02d}.png"
            shutil.copyfile(original, copy)
        else:
            copy = out / f"near_{n - count:02d}.jpg"
            Image.open(original).save(copy, quality=75)
        lines.append(f"{copy},{rows[pick]['label']},{original}")
    (out / "planted.csv").write_text("\n".join(lines) + "\n")
    return out / "planted.csv"


def duplicates(index: Index, planted: Path, results_dir: Path) -> dict:
    """Index ``planted`` and find its duplicate groups at three thresholds (module docstring, step 7)."""
    index.add(planted, workers=0, progress=False)
    pairs = {(r["path"], r["copy_of"]) for r in index.store.rows(("path", "copy_of")) if r.get("copy_of")}
    out = {}
    for threshold in (0.95, 0.99, 0.995):
        groups = find_duplicates(index.store, threshold)
        group_of = {path: n for n, g in enumerate(groups) for path in g.paths}
        found = {kind: sum(group_of.get(a, -1) == group_of.get(b, -2) for a, b in pairs
                           if (kind == "exact") == a.endswith(".png")) for kind in ("exact", "near")}
        out[str(threshold)] = {"groups": {k: sum(g.kind == k for g in groups) for k in ("exact", "near")},
                               "largest_group": max((len(g.ids) for g in groups), default=0),
                               "planted_pairs_found": found, "planted_pairs": len(pairs) // 2}
        write_duplicates_json(groups, results_dir / f"duplicates_{threshold}.json", threshold=threshold)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florence demo search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/search_demo", help="files, database, results and sheets")
    parser.add_argument("--backbone", default="runs/demo/pretrain/final",
                        help="the dual-encoder bundle (trained first by `florence demo` when absent)")
    parser.add_argument("--limit", type=int, default=None, help="images per split (default: all 70,000)")
    parser.add_argument("--image-queries", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="decoding processes while indexing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    results_dir, sheets = workdir / "results", workdir / "sheets"
    step = Steps()
    backbone = Path(args.backbone)
    if code := ensure_unicl_bundle(backbone, step):
        return code
    try:
        step(f"Fashion-MNIST as PNG files in {workdir / 'files'}")
        table = write_fashion_mnist_files(workdir / "files", limit=args.limit)
        report: dict = {"backbone": str(backbone), "collection": COLLECTION}
        with Index(workdir / "search.db", COLLECTION, model=backbone) as index:
            step(f"index {table} into {workdir / 'search.db'}")
            start = time.perf_counter()
            summary = index.add(table, workers=args.workers, batch_size=256)
            print(summary.text())
            report["index"] = {**summary.to_dict(), "rows": index.count(), "wall_s": time.perf_counter() - start}
            step("text search: 'a photo of a {class}', precision@10 per class")
            report["text_precision@10"] = text_queries(index, sheets)
            step(f"image search: {args.image_queries} test images as queries, same-class precision@10")
            report["image_precision@10"] = image_queries(index, args.image_queries, args.seed)
            step("tagging: zero-shot vs kNN with 1% / 10% trusted rows; writing the 10% kNN tags")
            report["tagging"] = tagging(index, args.seed)
            hits = index.search(text="a photo of a Bag", top_k=10, filter='tag == "Bag" and split == "test"')
            write_contact_sheet(hits, sheets / "tagged_bags_test.html", "'a photo of a Bag' among test rows tagged Bag")
        step("duplicates: 2,000 test images + 20 planted exact and 20 planted near copies")
        with Index(workdir / "search.db", COLLECTION + "_dup", embedder=index.embedder) as dup:
            report["duplicates"] = duplicates(dup, plant_duplicates(table, workdir / "planted", args.seed),
                                              results_dir)
    except FlorenceError as err:
        print(f"florence demo search: {err}", file=sys.stderr)
        return 2
    for key in GOALS:
        report[key.replace("@10", "@10_mean")] = float(np.mean(list(report[key].values())))
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "search.json").write_text(json.dumps(report, indent=2))
    step(f"results: {results_dir / 'search.json'}, contact sheets in {sheets}")
    for key, goal in GOALS.items():
        mean = report[key.replace("@10", "@10_mean")]
        print(f"{key:<22} {mean:.3f}  (goal >= {goal}: {'met' if mean >= goal else 'NOT met'})  "
              + ", ".join(f"{k} {v:.2f}" for k, v in report[key].items()))
    tags = report["tagging"]
    print("tag accuracy (same rows): " + ", ".join(f"{k} {tags[k]['accuracy']:.3f}"
                                                  for k in ("zeroshot", "knn_1%", "knn_10%")))
    for threshold, dup in report["duplicates"].items():
        print(f"duplicates at {threshold}: {dup['groups']} groups, largest {dup['largest_group']} rows, planted pairs "
              f"found {dup['planted_pairs_found']} of {dup['planted_pairs']} each")
    return 0


if __name__ == "__main__":
    sys.exit(main())

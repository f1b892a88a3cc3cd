"""Auto-tagging and duplicate groups (``florence.search.tagging`` / ``florence.search.dedup``): the kNN vote and the
near-duplicate components against brute force written with plain loops, then end to end on a Milvus Lite collection of
the scikit-image photos (plus a byte copy, a 1-pixel edit and a JPEG re-save) embedded by a fresh tiny dual encoder:
exact groups, zero-shot tags against ``florence predict``, threshold and overwrite rules, tag filters in search."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from skimage import data

import florence
from florence.benchmarks.predict import predict
from florence.search import Index, SearchError
from florence.search.dedup import (find_duplicates, format_groups, near_duplicate_components,
                                   write_duplicates_json)
from florence.search.tagging import (TAG_FIELDS, knn_vote, predict_tags, read_field, stored_tag_accuracy,
                                     tag_accuracy, tag_collection, write_tags)

pytestmark = pytest.mark.usefixtures("one_thread_module")

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "horse", "page", "rocket", "motorcycle")
LABELS = ["person", "cat", "cup", "rocket", "animal", "vehicle", "text"]
# file -> (truth, trusted label or ""): 5 trusted rows; the copies and the other photos are to be tagged
TABLE = {
    "astronaut.png": ("person", "person"), "camera.png": ("person", ""), "chelsea.png": ("cat", "cat"),
    "chelsea_copy.png": ("cat", ""), "coffee.png": ("cup", "cup"), "coffee_px.png": ("cup", ""),
    "horse.png": ("animal", "animal"), "motorcycle.png": ("vehicle", ""), "page.png": ("text", ""),
    "rocket.png": ("rocket", "rocket"), "rocket_q90.jpg": ("rocket", ""),
}


# --- brute force, written independently of the code under test ---------------------------------------------------


def _brute_knn(queries, keys, key_labels, num_labels, k):
    """Per query: every key's dot product by an explicit loop, the k largest, votes max(sim, 0) per label."""
    out = []
    for q in queries:
        sims = []
        for m, key in enumerate(keys):
            sims.append((sum(float(a) * float(b) for a, b in zip(q, key)), m))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_labels
        for sim, m in sims[:k]:
            votes[key_labels[m]] += max(sim, 0.0)
        best = max(range(num_labels), key=lambda c: (votes[c], -c))  # ties -> lowest label
        total = sum(votes)
        out.append((best, votes[best] / total if total > 0 else 0.0))
    return out


def _brute_components(vectors, threshold):
    """Breadth-first search over the full similarity matrix -> list of sets of row indices (size >= 2)."""
    sims = vectors @ vectors.T
    seen, groups = set(), []
    for start in range(len(vectors)):
        if start in seen:
            continue
        group, todo = {start}, [start]
        while todo:
            i = todo.pop()
            for j in range(len(vectors)):
                if j != i and j not in group and sims[i, j] >= threshold:
                    group.add(j)
                    todo.append(j)
        seen |= group
        if len(group) > 1:
            groups.append(group)
    return groups


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_vote_matches_brute_force():
    rng = np.random.default_rng(0)
    queries, keys = _unit(rng, 37, 8), _unit(rng, 23, 8)
    key_labels = rng.integers(0, 4, size=23)
    for k in (1, 5, 30):  # 30 > M: every key votes
        label, confidence = knn_vote(queries, keys, key_labels, 4, k=k, chunk=10)  # ragged chunks
        expected = _brute_knn(queries, keys, key_labels, 4, k)
        assert label.tolist() == [b for b, _ in expected]
        np.testing.assert_allclose(confidence, [c for _, c in expected], atol=1e-5)
    assert knn_vote(queries[:2], keys, key_labels, 4, k=1)[1].tolist() == [1.0, 1.0]  # one voter: its whole share


def test_near_duplicate_components_match_brute_force():
    rng = np.random.default_rng(1)
    centres = _unit(rng, 12, 6)
    x = centres[rng.integers(0, 12, size=60)] + 0.15 * rng.normal(size=(60, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for threshold in (0.9, 0.97):
        labels = near_duplicate_components(x, threshold, chunk=7)
        got = {}
        for n, root in enumerate(labels):
            got.setdefault(int(root), set()).add(n)
        expected = _brute_components(x, threshold)
        assert sorted(map(sorted, (g for g in got.values() if len(g) > 1))) == sorted(map(sorted, expected))
        assert all(root == min(got[root]) for root in got)  # the label is the smallest row of the component
        assert len(expected) >= 3 and any(len(g) > 2 for g in expected)  # the data has real groups to find


# --- a collection -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_dual_encoder):
    """The 8 photos at 64 px, ``chelsea_copy.png`` (same bytes), ``coffee_px.png`` (one pixel changed),
    ``rocket_q90.jpg`` (JPEG re-save), a CSV with ``truth`` and ``trusted`` columns, a fresh ``unicl_test`` bundle and
    the indexed collection."""
    root = tmp_path_factory.mktemp("tagdedup")
    folder = root / "photos"
    folder.mkdir()
    for name in PHOTOS:
        array = data.stereo_motorcycle()[1] if name == "motorcycle" else getattr(data, name)()
        image = Image.fromarray(array).convert("RGB")
        image.thumbnail((64, 64), Image.Resampling.BICUBIC)
        image.save(folder / f"{name}.png")
    shutil.copyfile(folder / "chelsea.png", folder / "chelsea_copy.png")
    image = Image.open(folder / "coffee.png").convert("RGB")
    r, g, b = image.getpixel((0, 0))
    image.putpixel((0, 0), ((r + 1) % 256, g, b))
    image.save(folder / "coffee_px.png")
    Image.open(folder / "rocket.png").convert("RGB").save(folder / "rocket_q90.jpg", quality=90)
    with open(root / "photos.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "truth", "trusted"])
        writer.writerows((f"photos/{name}", truth, trusted) for name, (truth, trusted) in TABLE.items())
    bundle = tiny_dual_encoder(["a photo of a cat", "a person", "a cup of coffee", "a rocket", "a vehicle", "text"] * 4)
    index = Index(root / "search.db", "photos", model=bundle)
    summary = index.add(root / "photos.csv", workers=0, progress=False)
    assert summary.indexed == len(TABLE)
    rows = {r["path"]: r for r in index.store.rows(("id", "path", "content_hash", "vector"))}
    ids = {name: rows[str(folder / name)]["id"] for name in TABLE}
    vectors = {name: np.asarray(rows[str(folder / name)]["vector"], np.float32) for name in TABLE}
    yield {"index": index, "folder": folder, "bundle": bundle, "ids": ids, "vectors": vectors,
           "name_of": {i: n for n, i in ids.items()}}
    index.close()


def _reset_tags(index):
    index.store.update([{"id": i, **{f: None for f in TAG_FIELDS}} for i, _ in zip(*index.store.vectors())])


def _tags(index):
    return {row["id"]: row for row in index.store.rows(("id", *TAG_FIELDS)) if row.get("tag") is not None}


# --- duplicates ---------------------------------------------------------------------------------------------------


def test_duplicate_groups_exact_and_near(photos, tmp_path):
    store, folder, vec = photos["index"].store, photos["folder"], photos["vectors"]
    groups = find_duplicates(store, 0.95, chunk=4)
    assert [(g.kind, [p.rsplit("/", 1)[1] for p in g.paths]) for g in groups] == [
        ("exact", ["chelsea.png", "chelsea_copy.png"]),  # the exact pair is not repeated as a near group
        ("near", ["coffee.png", "coffee_px.png"]),
        ("near", ["rocket.png", "rocket_q90.jpg"]),
    ]
    assert groups[0].ids == [photos["ids"]["chelsea.png"], photos["ids"]["chelsea_copy.png"]]
    rocket = float(vec["rocket.png"] @ vec["rocket_q90.jpg"])
    assert groups[2].max_score == groups[2].min_score == pytest.approx(rocket, abs=1e-5) and rocket < 0.9999
    assert groups[0].min_score == pytest.approx(1.0, abs=1e-5)
    # below the similarity of other photos: components against brute force, min / max over all member pairs
    names = sorted(TABLE)
    x = np.stack([vec[n] for n in names])
    sims = x @ x.T
    off = sims[~np.eye(len(names), dtype=bool)]
    distinct = np.unique(np.round(off[off < 0.99], 5))
    threshold = float(distinct[-3] + distinct[-4]) / 2  # links a few different photos, far from any pair's cosine
    assert distinct[-3] - distinct[-4] > 1e-4
    expected = [g for g in _brute_components(x, threshold)
                if len({(folder / names[i]).read_bytes() for i in g}) > 1]
    near = [g for g in find_duplicates(store, threshold) if g.kind == "near"]
    assert sorted(sorted(p.rsplit("/", 1)[1] for p in g.paths) for g in near) == sorted(
        sorted(names[i] for i in g) for g in expected)
    assert any(g.size > 2 for g in near)
    for g in near:
        member = [names.index(p.rsplit("/", 1)[1]) for p in g.paths]
        pair = sims[np.ix_(member, member)][~np.eye(len(member), dtype=bool)]
        assert g.max_score == pytest.approx(pair.max(), abs=1e-5) and g.min_score == pytest.approx(pair.min(), abs=1e-5)
    # a filter limits the rows compared; JSON and text
    only = find_duplicates(store, 0.95, filter='path like "%rocket%"')
    assert [g.kind for g in only] == ["near"] and len(only[0].paths) == 2
    assert find_duplicates(store, 0.95, filter='path like "%nothing%"') == []
    out = write_duplicates_json(groups, tmp_path / "out" / "dups.json", threshold=0.95)
    data = json.loads(out.read_text())
    assert (data["threshold"], data["exact_groups"], data["near_groups"]) == (0.95, 1, 2)
    assert data["groups"][1]["paths"] == groups[1].paths and data["groups"][1]["size"] == 2
    text = format_groups(groups, threshold=0.95, limit=2)
    assert "1 exact groups (2 rows), 2 near groups (4 rows)" in text and str(folder / "coffee_px.png") in text
    assert "1 more groups" in text and "rocket_q90" not in text
    with pytest.raises(SearchError, match="threshold"):
        find_duplicates(store, 0.0)
    with pytest.raises(SearchError, match="filter"):
        find_duplicates(store, 0.9, filter="path === 1")


# --- tagging ------------------------------------------------------------------------------------------------------


def test_zeroshot_tags_match_florence_predict(photos):
    index, ids = photos["index"], photos["ids"]
    got = predict_tags(index, LABELS, method="zeroshot", trusted_field="trusted")
    assert got.resolved == "zeroshot" and got.trusted == 5
    model = florence.from_pretrained(photos["bundle"])
    names = sorted(TABLE)
    reference = predict(model, [photos["folder"] / n for n in names], LABELS)
    row = {row_id: n for n, row_id in enumerate(got.ids)}
    for name, probabilities in zip(names, reference.probabilities):
        n = row[ids[name]]
        if TABLE[name][1]:  # trusted: its own label, confidence 1
            assert (got.method[n], got.tags()[n], got.confidence[n]) == ("trusted", TABLE[name][1], 1.0)
        else:
            assert got.method[n] == "zeroshot" and got.tags()[n] == LABELS[int(probabilities.argmax())]
            assert got.confidence[n] == pytest.approx(float(probabilities.max()), abs=1e-4)
    assert len(set(np.round(got.confidence, 4))) > 2  # not all the same number: the comparison means something


def test_knn_tags_match_brute_force_over_stored_vectors(photos):
    index, vec, name_of = photos["index"], photos["vectors"], photos["name_of"]
    got = predict_tags(index, LABELS, trusted_field="trusted", k=3)  # auto: 5 trusted rows >= k -> kNN
    assert got.resolved == "knn" and got.trusted == 5
    assert got.labels_without_trusted == ["vehicle", "text"]
    trusted = [n for n in sorted(TABLE) if TABLE[n][1]]
    keys = [vec[n] for n in trusted]
    key_labels = [LABELS.index(TABLE[n][1]) for n in trusted]
    for n, row_id in enumerate(got.ids):
        name = name_of[row_id]
        if TABLE[name][1]:
            assert got.method[n] == "trusted" and got.confidence[n] == 1.0
            continue
        best, share = _brute_knn([vec[name]], keys, key_labels, len(LABELS), 3)[0]
        assert (got.method[n], int(got.label[n])) == ("knn", best)
        assert got.confidence[n] == pytest.approx(share, abs=1e-5)
    # the copies sit on their trusted originals: same label
    assert got.tags()[got.ids.index(photos["ids"]["chelsea_copy.png"])] == "cat"
    assert predict_tags(index, LABELS, trusted_field="trusted", k=10).resolved == "zeroshot"  # 5 < k
    # labels may come from the trusted values alone
    from_trusted = predict_tags(index, None, trusted_field="trusted", k=3)
    assert from_trusted.labels == ["animal", "cat", "cup", "person", "rocket"]
    # vectors pulled once and a trusted mapping (the demo's evaluation splits) give the same answer
    pulled = index.store.vectors()
    mapping = read_field(index.store, "trusted")
    again = predict_tags(index, LABELS, trusted=mapping, k=3, vectors=pulled)
    assert again.ids == pulled[0]
    assert {i: (t, m) for i, t, m in zip(again.ids, again.tags(), again.method)} == {
        i: (t, m) for i, t, m in zip(got.ids, got.tags(), got.method)}


def test_threshold_overwrite_and_tag_filters(photos):
    index = photos["index"]
    _reset_tags(index)
    predicted = predict_tags(index, LABELS, trusted_field="trusted", k=3)
    untrusted = predicted.method != "trusted"
    confidences = sorted(set(predicted.confidence[untrusted].tolist()))
    assert len(confidences) >= 2
    threshold = (confidences[0] + confidences[-1]) / 2
    summary = tag_collection(index, LABELS, trusted_field="trusted", k=3, threshold=threshold, method="knn")
    above = [n for n in range(len(predicted.ids)) if untrusted[n] and predicted.confidence[n] >= threshold]
    below = [n for n in range(len(predicted.ids)) if untrusted[n] and predicted.confidence[n] < threshold]
    assert above and below
    stored = _tags(index)
    for n, row_id in enumerate(predicted.ids):
        if n in below:
            assert row_id not in stored
            continue
        row = stored[row_id]
        assert (row["tag"], row["tag_method"]) == (predicted.tags()[n], predicted.method[n])
        assert row["tag_confidence"] == pytest.approx(float(predicted.confidence[n]), abs=1e-6)
    assert (summary.tagged, summary.below_threshold, summary.cleared, summary.kept) == (5 + len(above), len(below), 0,
                                                                                        0)
    assert summary.by_method == {"trusted": 5, "knn": len(above)}
    assert summary.per_label == dict(Counter(row["tag"] for row in stored.values()))
    json.dumps(summary.to_dict())
    assert f"tagged {5 + len(above)} of {len(TABLE)} rows" in summary.text()
    # tags are queryable
    for label in set(row["tag"] for row in stored.values()):
        hits = index.search(text="a photo", top_k=20, filter=f'tag == "{label}"')
        assert {h.id for h in hits} == {i for i, row in stored.items() if row["tag"] == label}
    # overwrite=False: tagged rows keep their kNN tags, the untagged ones get zero-shot tags
    summary = tag_collection(index, LABELS, trusted_field="trusted", threshold=0.0, method="zeroshot")
    after = _tags(index)
    assert summary.kept == len(above) and summary.by_method == {"trusted": 5, "zeroshot": len(below)}
    assert all(after[predicted.ids[n]]["tag_method"] == "knn" for n in above)
    assert all(after[predicted.ids[n]]["tag_method"] == "zeroshot" for n in below)
    # overwrite=True with a threshold no prediction reaches: every machine tag is cleared, trusted ones stay
    zs = predict_tags(index, LABELS, trusted_field="trusted", method="zeroshot")
    assert zs.confidence[zs.method == "zeroshot"].max() < 1.0
    summary = tag_collection(index, LABELS, trusted_field="trusted", threshold=1.0, method="zeroshot", overwrite=True)
    assert (summary.cleared, summary.below_threshold, summary.tagged) == (6, 6, 5)
    untagged = {r["id"] for r in index.store.rows(("id",), "tag is null")}
    assert untagged == {i for i, n in zip(predicted.ids, untrusted) if n}
    assert {r["id"]: r["tag"] for r in index.store.rows(("id", "tag"), 'tag_method == "trusted"')} == {
        photos["ids"][name]: t for name, (_, t) in TABLE.items() if t}
    # a filter limits the rows tagged; the trusted rows outside it still vote
    summary = tag_collection(index, LABELS, trusted_field="trusted", k=3, threshold=0.0, filter='path like "%copy%"')
    assert summary.rows == 1 and summary.by_method == {"trusted": 0, "knn": 1}
    assert _tags(index)[photos["ids"]["chelsea_copy.png"]]["tag"] == "cat"


def test_tag_accuracy(photos):
    index = photos["index"]
    truth = read_field(index.store, "truth")
    assert len(truth) == len(TABLE)
    predicted = predict_tags(index, LABELS, trusted_field="trusted", k=3)
    scored = [(t, truth[i], c) for i, t, m, c in zip(predicted.ids, predicted.tags(), predicted.method,
                                                       predicted.confidence) if m == "knn"]
    result = tag_accuracy(predicted, truth, threshold=0.6)
    assert result["rows"] == 6
    assert result["accuracy"] == pytest.approx(np.mean([t == g for t, g, _ in scored]))
    assert result["coverage"] == pytest.approx(np.mean([c >= 0.6 for _, _, c in scored]))
    assert tag_accuracy(predicted, truth, methods=("trusted",))["accuracy"] == 1.0
    assert tag_accuracy(predicted, truth, ids=[photos["ids"]["chelsea_copy.png"]])["accuracy"] == 1.0
    _reset_tags(index)
    write_tags(index.store, predicted, threshold=0.0)
    stored = stored_tag_accuracy(index.store, "truth")
    assert (stored["rows"], stored["untagged"]) == (6, 0) and stored["accuracy"] == pytest.approx(result["accuracy"])


def test_tagging_errors(photos):
    index = photos["index"]
    with pytest.raises(SearchError, match="florence writes"):
        predict_tags(index, LABELS, trusted_field="tag")
    with pytest.raises(SearchError, match="method"):
        predict_tags(index, LABELS, method="vote")
    with pytest.raises(SearchError, match="needs trusted rows"):
        predict_tags(index, LABELS, trusted_field="nothing_here", method="knn")
    with pytest.raises(SearchError, match="not among the labels: animal, cup, person, rocket"):
        predict_tags(index, ["cat"], trusted_field="trusted")
    with pytest.raises(SearchError, match="repeated label"):
        predict_tags(index, ["cat", "cat"])
    with pytest.raises(SearchError, match="filter"):
        predict_tags(index, LABELS, filter="tag === 1")
    with pytest.raises(SearchError, match="threshold"):
        tag_collection(index, LABELS, threshold=2.0)

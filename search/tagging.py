"""Auto-tagging a collection (``florence tag``): zero-shot against label prompts, or a k-nearest-neighbour vote among
rows that already carry a trusted tag; each tag with a confidence, none below a threshold.

**Zero-shot.** The prompt-ensemble classifier of ``florence predict`` / ``florence eval zeroshot``
(:func:`florence.adapters.zeroshot.build_zeroshot_classifier`, by default over the 80 CLIP ImageNet templates
:data:`florence.adapters.zeroshot.DEFAULT_TEMPLATES`), texts embedded by the collection's model. A row's
probabilities are ``softmax(s * cosine(row, class))`` over the labels, ``s = model.scale()`` (the clamped
``logit_scale.exp()``; 100 for a model without one), exactly as ``florence predict`` computes them: the tag is the most
probable label, its confidence that probability.

**kNN.** Rows whose ``trusted_field`` (a metadata field, e.g. a CSV column; any row of the collection, also outside
``filter``) holds a non-empty value are *trusted*: that value is their label. Every other row takes its ``k`` most
cosine-similar trusted rows (all of them when fewer) and each votes for its label with weight ``max(cosine, 0)``; the
tag is the label with the largest summed weight (a tie goes to the label listed first), its confidence that label's
share of the summed weight (0 when every weight is 0). Computed on vectors pulled once from the store
(:meth:`florence.search.store.Store.vectors`) with chunked torch matmuls, not per-row database queries.

**Trusted rows** themselves get their own label as tag, confidence 1, method ``trusted``, whatever ``method`` is.

**method**: ``"zeroshot"``, ``"knn"`` (an error without trusted rows) or ``"auto"``: kNN for the untrusted rows when
the collection has at least ``k`` trusted rows, zero-shot otherwise (one method for all rows, so the confidences are
comparable; fewer than ``k`` trusted rows make a poor vote). kNN can only give labels that some trusted row carries;
:attr:`TagSummary.labels_without_trusted` names the others.

**Writing** (:func:`write_tags`): fields ``tag`` (str), ``tag_confidence`` (float) and ``tag_method``
(``trusted`` / ``knn`` / ``zeroshot``) through partial upserts (:meth:`Store.update`; the vector and other metadata
stay). A prediction whose confidence is below ``threshold`` writes no tag. With ``overwrite=False`` (the default) a row
that already has a tag keeps it and only untagged rows are tagged (new files since the last run); with
``overwrite=True`` every row is re-tagged, and a row now below the threshold has its old tag *cleared*: all three
fields set to null (measured on Milvus Lite: such a row matches ``tag is null`` / ``not exists tag`` and no
``tag == "x"``). Trusted rows are always (re)written: a person's label outranks a machine's. The trusted field must not
be ``tag`` itself (a later run would trust machine tags).

**Evaluation** for the report (zero-shot alone vs kNN with 1% / 10% of rows trusted): pull the vectors once, call
:func:`predict_tags` with ``vectors=`` and a ``trusted={id: label}`` mapping per split, score each with
:func:`tag_accuracy` against ground truth (:func:`read_field`), and write only the chosen run with :func:`write_tags`.
:func:`stored_tag_accuracy` scores the tags already written.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from florence.adapters import zeroshot as zs
from florence.search.store import BASE_FIELDS, SearchError, Store

if TYPE_CHECKING:
    from florence.search.index import Index

__all__ = ["TAG_FIELDS", "METHODS", "TagPredictions", "TagSummary", "tag_collection", "predict_tags", "write_tags",
           "knn_vote", "zeroshot_probabilities", "tag_accuracy", "stored_tag_accuracy", "read_field"]

TAG_FIELDS = ("tag", "tag_confidence", "tag_method")
METHODS = ("auto", "zeroshot", "knn")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class TagPredictions:
    """A tag for every row considered (before the threshold), in the order of ``ids``.

    Attributes:
        labels: the ``C`` label names.
        ids: the ``N`` row ids.
        label: ``(N,)`` int64 index into ``labels``.
        confidence: ``(N,)`` float32 in [0, 1] (1 for trusted rows).
        method: ``(N,)`` str, ``"trusted"``, ``"knn"`` or ``"zeroshot"`` per row.
        resolved: the method used for the untrusted rows (``"knn"`` or ``"zeroshot"``; ``"auto"`` resolved).
        trusted: trusted rows found (also those outside the filter, which voted but are not in ``ids``).
        labels_without_trusted: labels no trusted row carries (kNN never gives them).
        k: neighbours in the kNN vote.
    """

    labels: list[str]
    ids: list[str]
    label: np.ndarray
    confidence: np.ndarray
    method: np.ndarray
    resolved: str
    trusted: int = 0
    labels_without_trusted: list[str] = field(default_factory=list)
    k: int = 10

    def tags(self) -> list[str]:
        """The ``N`` predicted label names."""
        return [self.labels[i] for i in self.label]


@dataclass
class TagSummary:
    """What :func:`write_tags` / :func:`tag_collection` did.

    ``rows``: rows considered; ``tagged``: tags written (``by_method`` splits them: trusted / knn / zeroshot);
    ``below_threshold``: rows left without a new tag (``cleared`` of them lost an old one); ``kept``: rows that already
    had a tag and kept it (``overwrite=False``); ``per_label``: tags written per label.
    """

    rows: int = 0
    method: str = ""
    trusted: int = 0
    tagged: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    below_threshold: int = 0
    cleared: int = 0
    kept: int = 0
    per_label: dict[str, int] = field(default_factory=dict)
    labels_without_trusted: list[str] = field(default_factory=list)
    threshold: float = 0.5
    k: int = 10
    overwrite: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def text(self) -> str:
        by = ", ".join(f"{m} {n}" for m, n in self.by_method.items())
        how = (f"kNN over {self.trusted} trusted rows, k={self.k}" if self.method == "knn"
               else f"zero-shot; {self.trusted} trusted rows")
        lines = [f"tagged {self.tagged} of {self.rows} rows ({how}; threshold {self.threshold:g}): {by or 'none'}",
                 f"below threshold {self.below_threshold} (old tags cleared: {self.cleared}); kept existing tags: "
                 f"{self.kept}" + ("" if self.overwrite else " (overwrite to re-tag them)")]
        if self.per_label:
            lines.append("per label: " + ", ".join(f"{name} {n}" for name, n in self.per_label.items()))
        if self.labels_without_trusted:
            lines.append("labels no trusted row carries (kNN cannot give them): "
                         + ", ".join(self.labels_without_trusted))
        lines.append(f"{self.seconds:.1f} s")
        return "\n".join(lines)


# --- the two predictors (pure functions of vectors) ---------------------------------------------------------------


@torch.no_grad()
def knn_vote(queries: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, num_labels: int, k: int = 10,
             chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted vote of each query's ``k`` nearest keys (module docstring).

    Args:
        queries: ``(Q, D)`` unit vectors.
        keys: ``(M, D)`` unit vectors of the trusted rows, ``M >= 1``.
        key_labels: ``(M,)`` int label index of each key, in ``[0, num_labels)``.
        num_labels: ``C``.
        k: neighbours per query (``min(k, M)`` are used).
        chunk: queries per matmul (a ``(chunk, M)`` similarity block).

    Returns:
        ``(label (Q,) int64, confidence (Q,) float32)``: the winning label and its share of the summed weights.
    """
    keys_t = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))  # M, D
    labels_t = torch.from_numpy(np.asarray(key_labels, dtype=np.int64))  # M
    kk = min(int(k), keys_t.shape[0])
    out_label, out_conf = [], []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32))  # c, D
        top, index = (q @ keys_t.T).topk(kk, dim=1)  # c, kk
        votes = torch.zeros(q.shape[0], num_labels).scatter_add_(1, labels_t[index], top.clamp(min=0))  # c, C
        best, total = votes.argmax(dim=1), votes.sum(dim=1)  # c
        share = votes.gather(1, best[:, None])[:, 0] / total.clamp(min=1e-12)
        out_label.append(best)
        out_conf.append(torch.where(total > 0, share, torch.zeros_like(share)))
    if not out_label:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return torch.cat(out_label).numpy(), torch.cat(out_conf).float().numpy()


def zeroshot_probabilities(vectors: np.ndarray, class_embeddings: np.ndarray, scale: float) -> np.ndarray:
    """``(N, D)`` unit row vectors, ``(C, D)`` unit class embeddings -> ``(N, C)`` float32 probabilities,
    ``softmax(scale * cosine)`` in float64 (as ``florence predict``)."""
    logits = scale * (np.asarray(vectors, np.float32) @ np.asarray(class_embeddings, np.float32).T)  # N, C
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).float().numpy()


# --- reading the store --------------------------------------------------------------------------------------------


def _check_field(name: str, what: str) -> str:
    if not _FIELD_NAME.match(name or ""):
        raise SearchError(f"{what} {name!r} is not a field name (letters, digits and _)")
    if name in (*BASE_FIELDS, "vector", *TAG_FIELDS):
        raise SearchError(f"{what} {name!r} is a field florence writes; name a metadata field (e.g. a CSV column)")
    return name


def read_field(store: Store, name: str, filter: str = "") -> dict[str, str]:
    """``{id: value}`` of the rows matching ``filter`` whose metadata field ``name`` holds a non-empty value (as a
    stripped string: a CSV number ``3`` reads ``"3"``)."""
    out = {}
    for row in store.rows(("id", name), filter):
        value = row.get(name)
        if value is not None and str(value).strip():
            out[row["id"]] = str(value).strip()
    return out


def _trusted_vectors(store: Store, trusted: Mapping[str, str], ids: list[str], vectors: np.ndarray,
                     batch: int = 4096) -> tuple[list[str], np.ndarray]:
    """Vectors of the trusted rows: from ``vectors`` when pulled already, else fetched by id (those outside the
    filter). Ids the collection does not have are left out."""
    position = {row_id: n for n, row_id in enumerate(ids)}
    inside = [t for t in trusted if t in position]
    outside = [t for t in trusted if t not in position]
    found, parts = list(inside), [vectors[[position[t] for t in inside]].reshape(len(inside), vectors.shape[1])]
    for start in range(0, len(outside), batch):
        rows = store.get(outside[start:start + batch], ("id", "vector"))
        found += [r["id"] for r in rows]
        parts.append(np.asarray([r["vector"] for r in rows], np.float32).reshape(len(rows), vectors.shape[1]))
    return found, np.concatenate(parts)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise SearchError(f"tag threshold must be in [0, 1], got {threshold}")


def _check_labels(labels: Sequence[str] | None) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(name).strip() for name in labels]
    if not labels or not all(labels):
        raise SearchError("tagging needs non-empty labels (one a line in --labels-file)")
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        raise SearchError(f"repeated label(s): {', '.join(repeated)}")
    return labels


# --- predict, write, both -----------------------------------------------------------------------------------------


def predict_tags(index: Index, labels: Sequence[str] | None, *, templates: Sequence[str] | None = None,
                 trusted_field: str | None = None, trusted: Mapping[str, str] | None = None, k: int = 10,
                 method: str = "auto", filter: str = "", vectors: tuple[list[str], np.ndarray] | None = None,
                 batch_size: int = 4096, progress: bool = False) -> TagPredictions:
    """A tag and a confidence for every row matching ``filter`` (module docstring); nothing is written.

    Args:
        index: the collection (zero-shot needs its model: ``Index(..., model=BUNDLE)``).
        labels: the label names; may be None for kNN (then the trusted values, sorted). Trusted values must be
            among the labels.
        templates: prompt templates with ``{}`` (default: the 80 CLIP ImageNet templates, as ``florence predict``).
        trusted_field: the metadata field holding trusted labels.
        trusted: ``{row id: label}`` used instead of ``trusted_field`` (evaluation splits).
        k: neighbours in the kNN vote.
        method: ``"auto"``, ``"zeroshot"`` or ``"knn"``.
        filter: a Milvus boolean expression selecting the rows to tag.
        vectors: ``(ids, (N, D) vectors)`` already pulled with ``index.store.vectors(filter)`` (saves a pull).
        batch_size: rows per similarity block.
        progress: a progress bar over the blocks.
    """
    if method not in METHODS:
        raise SearchError(f"tagging method {method!r} is not one of {', '.join(METHODS)}")
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    labels = _check_labels(labels)
    store = index.store
    ids, X = vectors if vectors is not None else store.vectors(filter)  # N, D
    if trusted is None:
        trusted = read_field(store, _check_field(trusted_field, "trusted field")) if trusted_field else {}
    trusted = {row_id: str(value).strip() for row_id, value in trusted.items() if str(value).strip()}
    if labels is None:
        labels = sorted(set(trusted.values()))
        if not labels:
            raise SearchError("tagging needs labels (--labels-file), or trusted rows (--trusted-field) to take them "
                              "from")
    unknown = sorted(set(trusted.values()) - set(labels))
    if unknown:
        raise SearchError(f"trusted {trusted_field or 'labels'} value(s) not among the labels: "
                          f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} (add them to the labels)")
    code = {name: n for n, name in enumerate(labels)}
    resolved = {"auto": "knn" if len(trusted) >= k else "zeroshot"}.get(method, method)
    label, confidence = np.zeros(len(ids), np.int64), np.zeros(len(ids), np.float32)
    kinds = np.full(len(ids), resolved, dtype=object)
    is_trusted = np.array([row_id in trusted for row_id in ids], dtype=bool)
    others = np.flatnonzero(~is_trusted)
    missing: list[str] = []
    if resolved == "knn":
        key_ids, keys = _trusted_vectors(store, trusted, ids, X)
        if not key_ids:
            raise SearchError(f"{store.where}: kNN tagging needs trusted rows, and no row has a value in "
                              f"{trusted_field or 'the trusted mapping'}")
        key_labels = np.array([code[trusted[t]] for t in key_ids], np.int64)
        voted = set(key_labels.tolist())
        missing = [name for n, name in enumerate(labels) if n not in voted]
        for start in tqdm(range(0, len(others), batch_size), desc="kNN vote", unit="block", disable=not progress):
            part = others[start:start + batch_size]
            label[part], confidence[part] = knn_vote(X[part], keys, key_labels, len(labels), k, batch_size)
    elif len(others):
        embedder = index.checked_embedder()
        classes = zs.build_zeroshot_classifier(lambda prompts: torch.from_numpy(embedder.embed_text(prompts)), labels,
                                               list(templates) if templates else zs.DEFAULT_TEMPLATES)  # C, D
        model = embedder.model
        scale = float(model.scale().detach()) if hasattr(model, "scale") else 100.0
        for start in tqdm(range(0, len(others), batch_size), desc="zero-shot", unit="block", disable=not progress):
            part = others[start:start + batch_size]
            probabilities = zeroshot_probabilities(X[part], classes.numpy(), scale)  # b, C
            label[part], confidence[part] = probabilities.argmax(1), probabilities.max(1)
    for n in np.flatnonzero(is_trusted):
        label[n], confidence[n], kinds[n] = code[trusted[ids[n]]], 1.0, "trusted"
    return TagPredictions(labels, list(ids), label, confidence, kinds, resolved, len(trusted), missing, k)


def write_tags(store: Store, predictions: TagPredictions, *, threshold: float = 0.5, overwrite: bool = False,
               batch_size: int = 4096, progress: bool = False) -> TagSummary:
    """Write ``predictions`` into ``tag`` / ``tag_confidence`` / ``tag_method`` by the rules of the module docstring
    (threshold, overwrite, trusted rows always)."""
    _check_threshold(threshold)
    start_time = time.perf_counter()
    summary = TagSummary(rows=len(predictions.ids), method=predictions.resolved, trusted=predictions.trusted,
                         by_method={m: 0 for m in ("trusted", predictions.resolved)},
                         labels_without_trusted=list(predictions.labels_without_trusted), threshold=threshold,
                         k=predictions.k, overwrite=overwrite)
    per_label: Counter[str] = Counter()
    bar = tqdm(total=len(predictions.ids), desc="writing tags", unit="row", disable=not progress)
    for start in range(0, len(predictions.ids), batch_size):
        ids = predictions.ids[start:start + batch_size]
        old = {row["id"]: row.get("tag") for row in store.get(ids, ("id", "tag"))}
        updates = []
        for n, row_id in enumerate(ids, start):
            if row_id not in old:  # deleted since the prediction: a partial upsert must not re-create it
                continue
            how, has_tag = predictions.method[n], old.get(row_id) is not None
            if how != "trusted" and has_tag and not overwrite:
                summary.kept += 1
            elif how == "trusted" or predictions.confidence[n] >= threshold:
                name = predictions.labels[predictions.label[n]]
                updates.append({"id": row_id, "tag": name, "tag_confidence": float(predictions.confidence[n]),
                                "tag_method": how})
                summary.by_method[how] = summary.by_method.get(how, 0) + 1
                per_label[name] += 1
            else:
                summary.below_threshold += 1
                if has_tag:
                    updates.append({"id": row_id, **{name: None for name in TAG_FIELDS}})
                    summary.cleared += 1
        store.update(updates)
        bar.update(len(ids))
    bar.close()
    summary.tagged = sum(summary.by_method.values())
    summary.per_label = {name: per_label[name] for name in predictions.labels if per_label[name]}
    summary.seconds = time.perf_counter() - start_time
    return summary


def tag_collection(index: Index, labels: Sequence[str] | None, *, templates: Sequence[str] | None = None,
                   trusted_field: str | None = None, k: int = 10, threshold: float = 0.5, method: str = "auto",
                   filter: str = "", overwrite: bool = False, batch_size: int = 4096,
                   progress: bool = False) -> TagSummary:
    """Predict (:func:`predict_tags`) and write (:func:`write_tags`) tags for the rows matching ``filter``."""
    _check_threshold(threshold)
    start = time.perf_counter()
    predictions = predict_tags(index, labels, templates=templates, trusted_field=trusted_field, k=k, method=method,
                               filter=filter, batch_size=batch_size, progress=progress)
    summary = write_tags(index.store, predictions, threshold=threshold, overwrite=overwrite, batch_size=batch_size,
                         progress=progress)
    summary.seconds = time.perf_counter() - start
    return summary


# --- accuracy -----------------------------------------------------------------------------------------------------


def _accuracy(pairs: list[tuple[str, str, float]], threshold: float) -> dict[str, Any]:
    """``(predicted, truth, confidence)`` triples -> accuracy, coverage at ``threshold`` and accuracy there."""
    covered = [(p, t) for p, t, c in pairs if c >= threshold]
    return {"rows": len(pairs),
            "accuracy": float(np.mean([p == t for p, t, _ in pairs])) if pairs else float("nan"),
            "threshold": threshold,
            "coverage": len(covered) / len(pairs) if pairs else float("nan"),
            "accuracy_at_threshold": float(np.mean([p == t for p, t in covered])) if covered else float("nan")}


def tag_accuracy(predictions: TagPredictions, truth: Mapping[str, str], *, threshold: float = 0.0,
                 methods: Sequence[str] = ("knn", "zeroshot"), ids: Iterable[str] | None = None) -> dict[str, Any]:
    """Accuracy of predictions (before writing) against ``truth`` ``{id: label}`` (e.g. :func:`read_field`).

    Scored rows: those predicted by one of ``methods`` (trusted rows are left out by default: they are given, not
    predicted), with a truth value, and in ``ids`` when given (to score several runs on the same rows). Returns
    ``{"rows", "accuracy" (top-1, any confidence), "threshold", "coverage" (share at or above threshold),
    "accuracy_at_threshold"}``.
    """
    keep = None if ids is None else set(ids)
    pairs = [(predictions.labels[predictions.label[n]], str(truth[row_id]).strip(), float(predictions.confidence[n]))
             for n, row_id in enumerate(predictions.ids)
             if predictions.method[n] in methods and row_id in truth and (keep is None or row_id in keep)]
    return _accuracy(pairs, threshold)


def stored_tag_accuracy(store: Store, truth_field: str, *, filter: str = "",
                        methods: Sequence[str] = ("knn", "zeroshot")) -> dict[str, Any]:
    """Accuracy of the tags written in the collection against the metadata field ``truth_field``, over the rows
    matching ``filter`` with a truth value and a tag written by one of ``methods``; ``"untagged"`` counts the rows
    with a truth value but no tag (below the threshold or never tagged)."""
    truth_field = _check_field(truth_field, "truth field")
    pairs, untagged = [], 0
    for row in store.rows(("id", truth_field, *TAG_FIELDS), filter):
        value = row.get(truth_field)
        if value is None or not str(value).strip():
            continue
        if row.get("tag") is None:
            untagged += 1
        elif row.get("tag_method") in methods:
            pairs.append((str(row["tag"]), str(value).strip(), float(row.get("tag_confidence") or 0.0)))
    return {**_accuracy(pairs, 0.0), "untagged": untagged}

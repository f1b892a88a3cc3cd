"""VQAv2 data: question and annotation files, METER's answer vocabulary and soft targets, the minival hold-out, the
endless resumable training stream and the evaluation loader.

**Files** (:class:`VQADataset`), as users download them from visualqa.org:

- questions ``v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015,test2015}_questions.json``:
  ``{"data_subtype": "train2014", "questions": [{"image_id", "question", "question_id"}], ...}``;
- annotations ``v2_mscoco_{train2014,val2014}_annotations.json`` (none for test-dev / test-std):
  ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
  "answers": [{"answer", "answer_confidence", "answer_id"}] * 10}]}``;
- images ``<images>/COCO_{data_subtype}_{image_id:012d}.jpg`` (``image_pattern``; the same stem with ``.png`` is
  tried when the ``.jpg`` is absent);
- or a CSV / TSV question table with a header ``question_id,image,question[,answers]`` (``image`` relative to
  ``images``, ``answers`` the annotators' answers separated by ``|``, each stripped; image ids are given in order of
  first appearance; ``multiple_choice_answer`` is the most frequent answer, the first one on ties; the annotations
  it yields (:meth:`VQADataset.annotations_dict`) have answer type ``other`` and question type ``none of the above``).

Problems with single entries never stop a run; each is counted by reason (:meth:`VQADataset.summary`, with the first
few examples) and the question dropped:

==================================================  ===========================================================
``question without annotation``                     annotations given, none for this question
``annotation for an unknown question``              an annotation whose question id is not in the questions file
``annotation image id differs from the question's``  the two files disagree about the image
``bad answers list``                                ``answers`` not a non-empty list of ``{"answer": str}``
``missing image file``                              neither the ``.jpg`` nor the ``.png`` exists
==================================================  ===========================================================

A file that cannot be read, or an entry without a required key, is a one-line
:class:`~florence.data.errors.DataFileError` naming the file, the entry and the key.

**Answers** (METER ``meter/utils/write_vqa.py``, SPEC §6.3): the vocabulary (:func:`build_answer_vocab`) is the
normalised (:func:`~florence.data.vqa_answers.normalize_answer`) ``multiple_choice_answer`` strings occurring at
least ``min_count`` (9) times over the given datasets (METER: every annotation of train2014 + val2014); METER orders
them by first occurrence, we by count (descending), then alphabetically. A question's soft targets
(:func:`soft_targets`) count the 10 **raw** answer strings (not normalised, as METER, SPEC §10.2 item 6: ``"Yes"``
never counts for ``"yes"``); each distinct raw string in the vocabulary gets the score 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2
/ 3 / >= 4 annotators. Training drops (and counts, ``VQATrainLoader.dropped``) questions without any in-vocabulary
answer, as METER drops them from train and val.

**Hold-out** (METER's minival, ``vqav2_rest_val``): ``holdout_images=k`` sets apart the last ``k`` images of a
seeded shuffle of the split's image ids (``part="holdout"``); ``part="train"`` is the rest (METER's
``trainable_val``, merged into training as another source). METER shuffles unseeded (``random.shuffle`` of the image
paths) among the images left with a question after dropping; we shuffle with ``holdout_seed`` among the images of
the questions kept here, so the hold-out does not depend on the vocabulary. (METER's released ``VQAv2Dataset``
itself trains on train + the whole of val and validates on val: the two val parts are written but not used.)

**Training stream** (``build_vqa_train_loader``; the ``data:`` section of a ``vqa`` run)::

    sources:                       # concatenated (each question once per epoch), e.g. train + val's trainable part
      - questions: v2_OpenEnded_mscoco_train2014_questions.json     # or a .csv / .tsv question table
        annotations: v2_mscoco_train2014_annotations.json           # required (unless the table has answers)
        images: train2014/
        image_pattern: "COCO_{data_subtype}_{image_id:012d}.jpg"    # optional, the default
        holdout_images: 0          # > 0: the last k images of a seeded shuffle are held out (METER: 1000 of val)
        holdout_seed: 0
        part: train                # train (without the hold-out) | all | holdout
        name: vqav2_train          # in logs (default: the questions file's stem)
    batch_size: 32                 # per rank (the engine sets it)
    seed: 0
    num_workers: 2
    max_questions: null            # the first N questions of each source
    samples_per_epoch: null        # default: all kept questions
    on_bad_sample: skip            # skip | raise (an unreadable image)
    max_bad_retries: 16
    pin_memory: false
    prefetch_factor: null
    run_dir: null

It is the florence training stream (:mod:`florence.data.mixing`): endless, seeded, split over ranks, and
``state_dict`` / ``load_state_dict`` continue with exactly the next batch. Images are resized whole to the model's
input size (:func:`vqa_transform`: no crop, no flip; spatial questions need the whole, unmirrored picture).

**Batches** (dict of tensors, batch first)::

    images         (B, 3, H, W) float32   normalised with the model's mean / std
    input_ids      (B, L) int64           } tokenize(list of B questions)
    attention_mask (B, L) int64           }
    targets        (B, A) float32         soft scores over the A answers (training only)
    question_ids   (B,) int64
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import Dataset
from torchvision import transforms as T

from florence.data.bad_samples import BadSampleLog
from florence.data.errors import DataConfigError, DataFileError, DataNotFound
from florence.data.eval_loader import BatchEvalLoader
from florence.data.images import decode_image, to_rgb
from florence.data.json_columns import Strings, duplicate_id, int_column, object_list
from florence.data.loader import RetryingDataset, TrainLoader, stream_bad_log
from florence.data.schema import STREAM_SCHEMA, Check, _check_keys, _choice, _int, _optional, _path, _text
from florence.data.vqa_answers import normalize_answer

logger = logging.getLogger("florence.data")

DEFAULT_IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"
TABLE_SUFFIXES = (".csv", ".tsv")
ANSWER_SEPARATOR = "|"  # between the answers of a CSV row
PARTS = ("all", "train", "holdout")
MAX_EXAMPLES = 20  # listed examples per reason (all are counted)
_JOIN = "\x1f"  # joins a question's answers in memory (unit separator: not in answer text)
Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]


# --- answers (METER write_vqa.py) ---------------------------------------------------------------------------------


def answer_score(count: int) -> float:
    """METER ``get_score``: the soft score of an answer given by ``count`` of the annotators."""
    return 0.0 if count <= 0 else (0.3, 0.6, 0.9)[count - 1] if count < 4 else 1.0


def soft_targets(answers: Sequence[str], index: dict[str, int]) -> tuple[list[int], list[float]]:
    """METER's labels and scores of one question: each distinct **raw** answer string (in order of first occurrence)
    that is in the vocabulary ``index`` (answer -> label), scored by how many annotators gave exactly it."""
    labels, scores = [], []
    for answer, count in Counter(answers).items():  # insertion order, as METER's answer_count dict
        if answer in index:
            labels.append(index[answer])
            scores.append(answer_score(count))
    return labels, scores


def build_answer_vocab(datasets: Sequence[VQADataset], min_count: int = 9) -> list[str]:
    """The normalised ``multiple_choice_answer`` strings occurring at least ``min_count`` times over the questions
    of ``datasets`` (METER: train2014 and all of val2014, ``part="all"``), most frequent first, ties alphabetically.
    Questions without annotations are ignored."""
    counts: Counter[str] = Counter()
    for dataset in datasets:
        counts.update(normalize_answer(a) for a in dataset.multiple_choice_answers() if a is not None)
    return sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))


# --- the dataset --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAQuestion:
    """One question. ``answers``: the raw annotators' answers (empty without annotations); ``image``: its file."""

    question_id: int
    image_id: int
    question: str
    image: Path
    answers: list[str]
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None


@dataclass
class VQASummary:
    """What :class:`VQADataset` kept and skipped: ``counts`` per reason (module docstring), ``examples``
    ``{"file", "reason"}`` of the first ``MAX_EXAMPLES`` per reason."""

    file: str
    questions_in_file: int
    questions: int
    images: int
    part: str
    holdout_images: int
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)

    def format(self) -> str:
        """One line: ``q.json: 4 of 6 questions, 2 images [missing image file: 1, ...]``."""
        notes = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        part = f" ({self.part} part, {self.holdout_images} images held out)" if self.holdout_images else ""
        return (f"{self.file}: {self.questions} of {self.questions_in_file} questions, {self.images} images{part}"
                + (f" [{notes}]" if notes else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Table:
    """A question file read into columns (one row per question, file order), before any filtering."""

    question_ids: np.ndarray  # n int64
    image_ids: np.ndarray  # n int64
    texts: list[str]
    answers: list[list[str] | None]  # None: not annotated
    answer_types: list[str | None]
    question_types: list[str | None]
    mcas: list[str | None]
    image_files: dict[int, str] | None = None  # image id -> file (tables), else from the pattern
    data_subtype: str | None = None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFound(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise DataFileError(f"{path}: is a folder, expected a VQA {what} JSON file") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise DataFileError(f"{path}: not UTF-8 JSON text") from None
    if not isinstance(data, dict):
        raise DataFileError(f"{path}: expected a JSON object with a {what!r} list, got a {type(data).__name__}")
    return data


def _text_column(entries: list[dict], key: str, file: Path, where: str) -> list[str]:
    values = []
    for i, e in enumerate(entries):
        if key not in e:
            raise DataFileError(f"{file}: {where}[{i}]: missing key {key!r}")
        if not isinstance(e[key], str):
            raise DataFileError(f"{file}: {where}[{i}].{key}: expected text, got {e[key]!r}")
        values.append(e[key])
    return values


def _optional_text(entry: dict, key: str) -> str | None:
    value = entry.get(key)
    return value if isinstance(value, str) else None


def _answer_list(value: Any) -> list[str] | None:
    """The raw answers of an annotation's ``answers``, or None when it is not a non-empty list of answer dicts."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in value):
        return None
    return [a["answer"] for a in value]


def _check_pattern(pattern: str, key: str = "image_pattern") -> None:
    try:
        pattern.format(data_subtype="train2014", image_id=1)
    except (KeyError, IndexError, ValueError) as err:
        raise DataConfigError(f"{key}: {pattern!r} is not a file-name pattern with the fields {{data_subtype}} and "
                              f"{{image_id}} ({type(err).__name__}: {err})") from None


class VQADataset:
    """VQAv2 questions (+ annotations) and their images (see the module docstring for the rules).

    Args:
        questions: the questions JSON file, or a ``.csv`` / ``.tsv`` question table.
        annotations: the annotations JSON file (None: test-dev / test-std questions, or a table).
        images: the folder the image files are relative to (required).
        image_pattern: image file name from ``data_subtype`` and ``image_id`` (default :data:`DEFAULT_IMAGE_PATTERN`).
        max_questions: keep the first ``max_questions`` questions (file order, after filtering and the part).
        holdout_images: hold out the last ``holdout_images`` images of a shuffle seeded by ``holdout_seed``.
        part: ``"all"`` questions, ``"train"`` (without the hold-out) or ``"holdout"``.
        name: the dataset's name in logs (default: the questions file's stem).

    Attributes:
        question_ids, image_ids: ``(N,)`` int64 per kept question; ``questions_json`` / ``annotations_json``: the
        files; ``images_dir``; ``data_subtype``; ``has_annotations``.
    """

    def __init__(self, questions: str | Path, annotations: str | Path | None = None,
                 images: str | Path | None = None, *, image_pattern: str | None = None,
                 max_questions: int | None = None, holdout_images: int = 0, holdout_seed: int = 0, part: str = "all",
                 name: str | None = None):
        if images is None:
            raise DataConfigError(f"images: required (the image folder of {questions})")
        self.questions_json = Path(questions)
        self.annotations_json = Path(annotations) if annotations is not None else None
        self.images_dir = Path(images)
        self.image_pattern = image_pattern or DEFAULT_IMAGE_PATTERN
        self.name = name or self.questions_json.stem
        if part not in PARTS:
            raise DataConfigError(f"part: expected one of {', '.join(PARTS)}, got {part!r}")
        if part == "holdout" and holdout_images <= 0:
            raise DataConfigError("part: 'holdout' needs holdout_images > 0")
        self.part, self.holdout_images = part, int(holdout_images)
        _check_pattern(self.image_pattern)
        self._counts: Counter[str] = Counter()
        self._examples: list[dict[str, str]] = []
        is_table = self.questions_json.suffix.lower() in TABLE_SUFFIXES
        if is_table and self.annotations_json is not None:
            raise DataConfigError(f"annotations: a question table ({self.questions_json}) carries its answers; give "
                                  "no annotations file")
        table = self._read_table() if is_table else self._read_questions()
        if self.annotations_json is not None:
            self._join_annotations(table)
        if not self.images_dir.is_dir():
            raise DataNotFound(f"{self.images_dir}: image folder not found (images of {self.questions_json})")
        self.data_subtype = table.data_subtype
        self.has_annotations = (self.annotations_json is not None
                                or (is_table and any(a is not None for a in table.answers)))
        keep = self._select(table, holdout_seed, max_questions)
        self._store(table, keep)
        if self._counts:
            logger.warning("%s", self.summary().format())

    # -- reading ------------------------------------------------------------------------------------------------

    def _read_questions(self) -> _Table:
        file = self.questions_json
        data = _read_json(file, "questions")
        entries = object_list(data, "questions", file)
        qids = int_column(entries, "question_id", file, "questions")
        image_ids = int_column(entries, "image_id", file, "questions")
        texts = _text_column(entries, "question", file, "questions")
        subtype = data.get("data_subtype")
        if subtype is not None and not isinstance(subtype, str):
            raise DataFileError(f"{file}: data_subtype: expected text, got {subtype!r}")
        n = len(entries)
        return _Table(qids, image_ids, texts, [None] * n, [None] * n, [None] * n, [None] * n, data_subtype=subtype)

    def _read_table(self) -> _Table:
        file = self.questions_json
        try:
            with file.open(newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f, delimiter="\t" if file.suffix.lower() == ".tsv" else ","))
        except FileNotFoundError:
            raise DataNotFound(f"{file}: question table not found") from None
        except UnicodeDecodeError:
            raise DataFileError(f"{file}: not UTF-8 text") from None
        header = [h.strip() for h in rows[0]] if rows else []
        if header[:3] != ["question_id", "image", "question"] or header[3:] not in ([], ["answers"]):
            raise DataFileError(f"{file}: line 1: expected the header question_id,image,question[,answers], got "
                                f"{','.join(header)!r}")
        qids, image_ids, texts, answers, files = [], [], [], [], {}
        ids_of: dict[str, int] = {}
        for line, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataFileError(f"{file}: line {line}: {len(row)} fields, the header has {len(header)}")
            try:
                qids.append(int(row[0]))
            except ValueError:
                raise DataFileError(f"{file}: line {line}: question_id: expected an integer, got {row[0]!r}") from None
            image_ids.append(ids_of.setdefault(row[1], len(ids_of)))
            files[ids_of[row[1]]] = row[1]
            texts.append(row[2])
            cell = row[3].strip() if len(row) > 3 else ""
            answers.append([a.strip() for a in cell.split(ANSWER_SEPARATOR)] if cell else None)
        mcas = [Counter(a).most_common(1)[0][0] if a else None for a in answers]
        types = [("other", "none of the above") if a else (None, None) for a in answers]
        return _Table(np.asarray(qids, dtype=np.int64), np.asarray(image_ids, dtype=np.int64), texts, answers,
                      [t[0] for t in types], [t[1] for t in types], mcas, image_files=files)

    def _join_annotations(self, table: _Table) -> None:
        """Fill the table's answers from the annotations file, counting the mismatches."""
        file = self.annotations_json
        anns = object_list(_read_json(file, "annotations"), "annotations", file)
        ann_qids = int_column(anns, "question_id", file, "annotations")
        dup = duplicate_id(np.sort(ann_qids))
        if dup is not None:
            raise DataFileError(f"{file}: annotations: question id {dup} appears twice")
        for i, ann in enumerate(anns):
            if "answers" not in ann:
                raise DataFileError(f"{file}: annotations[{i}]: missing key 'answers'")
        row_of = {int(q): r for r, q in enumerate(table.question_ids.tolist())}
        for i, (ann, qid) in enumerate(zip(anns, ann_qids.tolist())):
            r = row_of.get(qid)
            where = f"annotations[{i}], question {qid}"
            if r is None:
                self._note("annotation for an unknown question", str(file), where)
                continue
            if "image_id" in ann and ann["image_id"] != int(table.image_ids[r]):
                self._note("annotation image id differs from the question's", str(file),
                           f"{where}: image {ann['image_id']}, the question's {int(table.image_ids[r])}")
                table.answers[r] = []  # dropped below, like a bad list, but counted under its own reason
                continue
            answers = _answer_list(ann["answers"])
            if answers is None:
                self._note("bad answers list", str(file), f"{where}: {str(ann['answers'])[:80]}")
                table.answers[r] = []
                continue
            table.answers[r] = answers
            table.answer_types[r] = _optional_text(ann, "answer_type")
            table.question_types[r] = _optional_text(ann, "question_type")
            table.mcas[r] = _optional_text(ann, "multiple_choice_answer")

    def _note(self, reason: str, file: str, detail: str) -> None:
        self._counts[reason] += 1
        if self._counts[reason] <= MAX_EXAMPLES:
            self._examples.append({"file": file, "reason": f"{reason} ({detail})"})

    # -- selection ----------------------------------------------------------------------------------------------

    def _image_name(self, table: _Table, image_id: int) -> str:
        """The image's file name relative to ``images``, from the table or ``image_pattern``."""
        if table.image_files is not None:
            return table.image_files[image_id]
        return self.image_pattern.format(data_subtype=table.data_subtype, image_id=image_id)

    def _select(self, table: _Table, holdout_seed: int, max_questions: int | None) -> np.ndarray:
        """Rows of the kept questions (file order); finds each image's file (``.jpg``, else the ``.png``)."""
        qids = table.question_ids
        dup = duplicate_id(np.sort(qids))
        if dup is not None:
            raise DataFileError(f"{self.questions_json}: question id {dup} appears twice")
        if (table.image_files is None and table.data_subtype is None
                and "data_subtype" in {f for _, f, _, _ in string.Formatter().parse(self.image_pattern)}):
            raise DataFileError(f"{self.questions_json}: missing key 'data_subtype' (image_pattern "
                                f"{self.image_pattern!r} needs it)")
        keep = np.ones(len(qids), dtype=bool)
        for r in range(len(qids)):
            if self.annotations_json is not None and table.answers[r] is None:
                keep[r] = False
                self._note("question without annotation", str(self.annotations_json), f"question {int(qids[r])}")
            elif table.answers[r] == []:
                keep[r] = False  # a bad annotation: counted while joining
        self._files: dict[int, str] = {}
        for image_id in dict.fromkeys(table.image_ids[keep].tolist()):
            name = self._image_name(table, image_id)
            for candidate in (name, str(Path(name).with_suffix(".png"))):
                if (self.images_dir / candidate).is_file():
                    self._files[image_id] = candidate
                    break
        for r in np.nonzero(keep)[0]:
            image_id = int(table.image_ids[r])
            if image_id not in self._files:
                keep[r] = False
                self._note("missing image file", str(self.images_dir / self._image_name(table, image_id)),
                           f"question {int(qids[r])}")
        self._questions_in_file = len(qids)
        rows = np.nonzero(keep)[0]
        if self.holdout_images:
            images = np.unique(table.image_ids[rows])  # sorted
            if self.holdout_images >= len(images):
                raise DataConfigError(f"holdout_images: {self.holdout_images} held out of the {len(images)} images of "
                                      f"{self.questions_json} leaves none for training")
            shuffled = images[np.random.default_rng(holdout_seed).permutation(len(images))]
            held = np.isin(table.image_ids[rows], shuffled[len(images) - self.holdout_images:])
            rows = rows[held] if self.part == "holdout" else rows[~held] if self.part == "train" else rows
        return rows[:max_questions] if max_questions is not None else rows

    def _store(self, table: _Table, rows: np.ndarray) -> None:
        """Keep the selected rows in compact columns (no per-question Python objects: forked workers share pages)."""
        self.question_ids = table.question_ids[rows]  # N
        self.image_ids = table.image_ids[rows]  # N
        self._texts = Strings([table.texts[r] for r in rows])
        self._answers = Strings([_JOIN.join(table.answers[r] or []) for r in rows])
        self._annotated = np.array([table.answers[r] is not None for r in rows], dtype=bool)  # N
        self._mcas = Strings([table.mcas[r] or "" for r in rows])
        kinds = sorted({t for r in rows for t in (table.answer_types[r], table.question_types[r]) if t is not None})
        code = {t: i for i, t in enumerate(kinds)}
        self._kinds = kinds
        self._types = np.array([[code.get(table.answer_types[r], -1), code.get(table.question_types[r], -1)]
                                for r in rows], dtype=np.int32).reshape(-1, 2)  # N, 2 (answer, question type)
        self._image_names = Strings([self._files[int(i)] for i in self.image_ids])

    # -- access -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.question_ids)

    def __getitem__(self, i: int) -> VQAQuestion:
        if not -len(self) <= i < len(self):
            raise IndexError(f"question {i} of {len(self)}")
        i = i % len(self)
        answer_type, question_type = (self._kinds[c] if c >= 0 else None for c in self._types[i])
        return VQAQuestion(question_id=int(self.question_ids[i]), image_id=int(self.image_ids[i]),
                           question=self._texts[i], image=self.image_path(i), answers=self.answers(i),
                           answer_type=answer_type, question_type=question_type,
                           multiple_choice_answer=self._mcas[i] if self._annotated[i] else None)

    def question(self, i: int) -> str:
        return self._texts[i]

    def answers(self, i: int) -> list[str]:
        """The raw annotators' answers of question ``i`` (empty without annotations)."""
        return self._answers[i].split(_JOIN) if self._annotated[i] else []

    def image_path(self, i: int) -> Path:
        return self.images_dir / self._image_names[i]

    def multiple_choice_answers(self) -> Iterator[str | None]:
        """``multiple_choice_answer`` of every question (None where absent)."""
        for i in range(len(self)):
            yield self._mcas[i] if self._annotated[i] and self._mcas[i] else None

    def load_image(self, i: int) -> Image.Image:
        """The decoded RGB image of question ``i``; :class:`~florence.data.images.BadSample` when unreadable."""
        return decode_image(self.image_path(i))

    def summary(self) -> VQASummary:
        return VQASummary(file=str(self.questions_json), questions_in_file=self._questions_in_file,
                          questions=len(self), images=len(np.unique(self.image_ids)), part=self.part,
                          holdout_images=self.holdout_images, counts=dict(self._counts),
                          examples=list(self._examples))

    def annotations_dict(self, question_ids: set[int] | None = None) -> dict[str, Any]:
        """The official annotations object (``{"annotations": [...]}``) of the kept questions (only those in
        ``question_ids`` if given), for :func:`florence.adapters.vqa_metric.vqa_accuracy`: the entries re-read from
        the annotations file as written (a table's are built: answer ids 1..n, answer type ``other``)."""
        wanted = set(self.question_ids.tolist()) if question_ids is None else \
            set(self.question_ids.tolist()) & {int(q) for q in question_ids}
        if self.annotations_json is not None:
            anns = _read_json(self.annotations_json, "annotations")["annotations"]
            return {"annotations": [a for a in anns if a.get("question_id") in wanted]}
        if not self.has_annotations:
            raise DataFileError(f"{self.questions_json}: these questions have no annotations (test questions?)")
        out = []
        for i in range(len(self)):
            q = self[i]
            if q.question_id in wanted and q.answers:
                out.append({"question_id": q.question_id, "image_id": q.image_id, "question_type": q.question_type,
                            "answer_type": q.answer_type, "multiple_choice_answer": q.multiple_choice_answer,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                        for j, a in enumerate(q.answers)]})
        return {"annotations": out}

    def __repr__(self) -> str:
        return f"VQADataset({self.questions_json}, {len(self)} questions, part {self.part})"


# --- images and batches -------------------------------------------------------------------------------------------


class VQATransform:
    """PIL image (any mode) -> ``(C, H, W)`` float: the whole image resized to ``input_size`` (antialiased, the
    model's interpolation), no crop, no flip, normalised with the model's mean / std. Picklable."""

    def __init__(self, preprocess: dict[str, Any]):
        for key in ("input_size", "mean", "std"):
            if key not in preprocess:
                raise KeyError(f"preprocess dict lacks {key!r} (has {sorted(preprocess)})")
        channels, height, width = (int(v) for v in preprocess["input_size"])
        self.channels = channels
        self.pipeline = T.Compose([
            T.Resize((height, width), interpolation=str_to_interp_mode(preprocess.get("interpolation", "bicubic")),
                     antialias=True),
            T.ToTensor(),
            T.Normalize(tuple(preprocess["mean"]), tuple(preprocess["std"])),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        return self.pipeline(image.convert("L") if self.channels == 1 else image)  # C, H, W


def vqa_transform(preprocess: dict[str, Any]) -> VQATransform:
    """The VQA image transform of a model's ``preprocess`` dict (train and eval alike)."""
    return VQATransform(preprocess)


def collate_vqa(samples: Sequence[dict[str, Any]], tokenize: Tokenize, num_answers: int | None = None
                ) -> dict[str, torch.Tensor]:
    """``[{"image" (3, H, W), "question", "question_id"[, "labels", "scores"]}] * B`` -> the batch of the module
    docstring; ``targets`` (B, A) only with ``num_answers``."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    tokens = tokenize([s["question"] for s in samples])
    batch = {"images": torch.stack([s["image"] for s in samples]),  # B, 3, H, W
             "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],  # B, L each
             "question_ids": torch.tensor([s["question_id"] for s in samples], dtype=torch.int64)}  # B
    if num_answers is not None:
        targets = torch.zeros(len(samples), num_answers, dtype=torch.float32)  # B, A
        for i, s in enumerate(samples):
            targets[i, torch.as_tensor(s["labels"], dtype=torch.int64)] = torch.as_tensor(s["scores"],
                                                                                          dtype=torch.float32)
        batch["targets"] = targets
    return batch


# --- training stream ----------------------------------------------------------------------------------------------


class VQATargets:
    """The trainable questions of one :class:`VQADataset` against a vocabulary: those with an in-vocabulary answer
    and their soft targets, in compact arrays (``labels[ptr[j]:ptr[j + 1]]`` are question ``rows[j]``'s)."""

    def __init__(self, dataset: VQADataset, index: dict[str, int]):
        rows, labels, scores, ptr = [], [], [], [0]
        for i in range(len(dataset)):
            lab, sc = soft_targets(dataset.answers(i), index)
            if lab:
                rows.append(i)
                labels.extend(lab)
                scores.extend(sc)
                ptr.append(len(labels))
        self.dataset = dataset
        self.name = dataset.name
        self.rows = np.asarray(rows, dtype=np.int64)  # n
        self.labels = np.asarray(labels, dtype=np.int64)  # sum of labels per question
        self.scores = np.asarray(scores, dtype=np.float32)
        self.ptr = np.asarray(ptr, dtype=np.int64)  # n + 1
        self.dropped = len(dataset) - len(rows)  # no in-vocabulary answer

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, j: int, transform: VQATransform) -> dict[str, Any]:
        """Trainable question ``j``: ``dict(image, question, question_id, labels, scores)``; raises
        :class:`BadSample` for an unreadable image."""
        i = int(self.rows[j])
        span = slice(int(self.ptr[j]), int(self.ptr[j + 1]))
        return {"image": transform(self.dataset.load_image(i)), "question": self.dataset.question(i),
                "question_id": int(self.dataset.question_ids[i]), "labels": self.labels[span],
                "scores": self.scores[span]}


class VQATrainDataset(RetryingDataset):
    """The training stream's questions; an unreadable image is replaced by the next question's
    (:class:`~florence.data.loader.RetryingDataset`)."""

    def __init__(self, sources: Sequence[VQATargets], transform: VQATransform, bad: BadSampleLog, *,
                 max_bad_retries: int = 16):
        super().__init__(sources, bad, max_bad_retries=max_bad_retries)
        self.transform = transform

    def load(self, source_id: int, index: int, seed: int, attempt: int) -> dict[str, Any]:
        return self.sources[source_id].sample(index, self.transform)  # the transform draws nothing at random


class VQATrainLoader(TrainLoader):
    """:class:`~florence.data.loader.TrainLoader` over a :class:`VQATrainDataset`: endless, resumable
    (``state_dict`` / ``load_state_dict``), ``bad_sample_summary()``; ``dropped``: per source, the questions
    without an in-vocabulary answer; ``annotation_summary()``: what each source skipped while reading its files."""

    @property
    def sources(self) -> list[VQATargets]:
        return self.dataset.sources

    @property
    def dropped(self) -> dict[str, int]:
        return {s.name: s.dropped for s in self.sources}

    def annotation_summary(self) -> list[VQASummary]:
        return [s.dataset.summary() for s in self.sources]


def _sources(v: Any) -> str | None:
    return None if isinstance(v, (list, tuple)) and v and all(isinstance(s, dict) for s in v) else \
        "expected a non-empty list of sources (mappings with questions, annotations, images)"


def _pattern(v: Any) -> str | None:
    if _text(v) is not None:
        return "expected a file-name pattern such as COCO_{data_subtype}_{image_id:012d}.jpg"
    try:
        _check_pattern(v)
    except DataConfigError:
        return "expected a file-name pattern with the fields {data_subtype} and {image_id}"
    return None


VQA_SOURCE_SCHEMA: dict[str, Check] = {
    "questions": _path,
    "annotations": _path,
    "images": _path,
    "image_pattern": _pattern,
    "holdout_images": _int(0),
    "holdout_seed": _int(0),
    "part": _choice(*PARTS),
    "name": _text,
}
VQA_DATA_SCHEMA: dict[str, Check] = {
    **STREAM_SCHEMA,
    "sources": _sources,
    "max_questions": _optional(_int(1)),
    "samples_per_epoch": _optional(_int(1)),
}


def validate_vqa_data(data: Any, key: str = "data") -> None:
    """Check a VQA ``data:`` section (module docstring) without reading any data; raises
    :class:`~florence.data.errors.DataConfigError` whose message starts with the dotted key
    (``data.sources[0].holdout_images: expected an integer >= 0, got -1``). ``batch_size`` is optional here."""
    if not isinstance(data, dict):
        raise DataConfigError(f"{key}: expected a mapping, got {data!r}")
    _check_keys(data, VQA_DATA_SCHEMA, key)
    if "sources" not in data:
        raise DataConfigError(f"{key}.sources: required (a list of VQA question / annotation / image sources)")
    for i, source in enumerate(data["sources"]):
        where = f"{key}.sources[{i}]"
        _check_keys(source, VQA_SOURCE_SCHEMA, where)
        for required in ("questions", "images"):
            if required not in source:
                raise DataConfigError(f"{where}.{required}: required")
        is_table = str(source["questions"]).lower().endswith(TABLE_SUFFIXES)
        if "annotations" not in source and not is_table:
            raise DataConfigError(f"{where}.annotations: required for training (the annotators' answers)")
        if source.get("part") == "holdout" and not source.get("holdout_images"):
            raise DataConfigError(f"{where}.part: 'holdout' needs holdout_images > 0")


def training_datasets(config: dict[str, Any]) -> list[VQADataset]:
    """The datasets of a ``data:`` section's ``sources`` as training reads them (each source's ``part``; default
    ``train`` with a hold-out, else ``all``): what the train stream draws from and the answer vocabulary counts."""
    datasets = []
    for spec in config["sources"]:
        holdout = int(spec.get("holdout_images", 0))
        datasets.append(VQADataset(spec["questions"], spec.get("annotations"), spec["images"],
                                   image_pattern=spec.get("image_pattern"), max_questions=config.get("max_questions"),
                                   holdout_images=holdout, holdout_seed=int(spec.get("holdout_seed", 0)),
                                   part=spec.get("part", "train" if holdout else "all"), name=spec.get("name")))
    return datasets


def build_vqa_train_loader(config: dict[str, Any], *, preprocess: dict[str, Any], tokenize: Tokenize,
                           answers: Sequence[str], rank: int = 0, world_size: int = 1,
                           run_dir: str | Path | None = None,
                           datasets: Sequence[VQADataset] | None = None) -> VQATrainLoader:
    """The training stream of rank ``rank`` of ``world_size`` from a VQA ``data:`` section (module docstring),
    validated first; ``answers``: the model's vocabulary; ``datasets``: ``training_datasets(config)`` when the caller
    has read them already (to build the vocabulary). A source left without a trainable question is a
    :class:`DataFileError`."""
    validate_vqa_data(config)
    if "batch_size" not in config:
        raise DataConfigError("data.batch_size: required (per rank)")
    if not answers:
        raise DataConfigError("answers: the answer vocabulary is empty")
    index = {a: i for i, a in enumerate(answers)}
    sources = []
    for dataset in datasets if datasets is not None else training_datasets(config):
        targets = VQATargets(dataset, index)
        if targets.dropped:
            logger.info("%s: %d of %d questions without an in-vocabulary answer dropped from training", dataset.name,
                        targets.dropped, len(dataset))
        if len(targets) == 0:
            raise DataFileError(f"{dataset.questions_json}: no trainable question left ({dataset.summary().format()}; "
                                f"{targets.dropped} without an in-vocabulary answer)")
        sources.append(targets)
    dataset = VQATrainDataset(sources, vqa_transform(preprocess), stream_bad_log(config, rank=rank, run_dir=run_dir),
                              max_bad_retries=config.get("max_bad_retries", 16))
    collate = functools.partial(collate_vqa, tokenize=tokenize, num_answers=len(answers))
    return VQATrainLoader.for_dataset(dataset, [len(s) for s in sources], config, collate_fn=collate, rank=rank,
                                      world_size=world_size)  # weights = sizes: plain concatenation


# --- evaluation loader --------------------------------------------------------------------------------------------


class _EvalQuestions(Dataset):
    """``dataset[i]`` -> question ``i``'s sample; raises ``BadSample`` for an unreadable image (the loader skips it)."""

    def __init__(self, dataset: VQADataset, transform: VQATransform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.transform(self.dataset.load_image(i))  # BadSample when unreadable: the loader skips it
        return {"image": image, "question": self.dataset.question(i),
                "question_id": int(self.dataset.question_ids[i])}


def vqa_eval_loader(dataset: VQADataset, *, preprocess: dict[str, Any], tokenize: Tokenize, batch_size: int = 64,
                    num_workers: int = 0, on_bad_sample: str = "skip") -> BatchEvalLoader:
    """Deterministic evaluation batches ``{"images", "input_ids", "attention_mask", "question_ids"}`` of ``dataset``
    in question order (images resized whole, as in training); questions whose image is unreadable are left out,
    counted and listed by ``report()`` (:class:`~florence.data.eval_loader.BatchEvalLoader`)."""
    return BatchEvalLoader(_EvalQuestions(dataset, vqa_transform(preprocess)),
                           functools.partial(collate_vqa, tokenize=tokenize), batch_size=batch_size,
                           num_workers=num_workers, on_bad_sample=on_bad_sample, name=dataset.name)

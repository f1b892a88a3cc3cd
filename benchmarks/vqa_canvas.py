"""Fashion-MNIST VQA: real Fashion-MNIST items on a grid of a textured canvas, with VQAv2-format questions and answers.

``generate(out_dir, split, num_images, seed)`` writes, in VQAv2's layout (data type ``fmnist``, subtype
``fmnist_<split>``):

- ``out_dir/v2_OpenEnded_fmnist_<split>_questions.json``: ``info``, ``task_type`` "Open-Ended", ``data_type``,
  ``data_subtype``, ``license`` and ``questions`` ``[{"image_id", "question", "question_id"}]``;
- ``out_dir/v2_fmnist_<split>_annotations.json``: ``annotations`` ``[{"question_id", "image_id", "question_type",
  "answer_type", "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}] * 10}]``;
- ``out_dir/<split>/COCO_fmnist_<split>_<image_id:012d>.png`` (RGB, ``canvas`` x ``canvas``; image ids 1..N,
  question ids ``image_id * 1000 + k`` as in VQAv2);
- ``out_dir/layout_fmnist_<split>.json``: per image its items (class, grid cell, position, size) and per question its
  kind, from which every answer can be recomputed; ``out_dir/manifest_fmnist_<split>.json``: parameters + hashes.

The ``train`` split pastes items of Fashion-MNIST's train set, ``test`` items of its test set. CLI::

    python -m florence.benchmarks.vqa_canvas --out DIR --train-images 4000 --test-images 400

A canvas (all draws from ``numpy.random.default_rng([seed, split, image index])``, so image ``i`` does not depend on
how many images are generated): a background (``backdrop``: "plain", one dark colour with pixel noise, the default;
or "texture", the detection canvases' textured backgrounds, :func:`florence.benchmarks.detection_canvas.background`,
on which the demo's UniCL tower recognises far fewer items); a ``grid`` x ``grid`` grid of cells; ``min_items`` ..
``max_items`` items, each in its own random cell: 2-3 classes are drawn per image and each item's class from them (so
a class often occurs 2-3 times), the item a random one of that class, resized to a square of side s uniform in
``scale`` at a uniform position inside its cell, blended in a flat bright colour as in the detection canvases.

Questions (``questions_per_image`` per image, no question twice; each question's answer type is drawn with the
weights ``mix`` among the types the image still offers; images run out of "other" questions most often, so the
default weights 0.31 / 0.20 / 0.49 give about 35% yes/no, 25% number and 40% other questions):

- yes/no, ``is there a`` ("is there a bag?"): the answers alternate within an image (the first one either way), so
  yes and no are balanced; no = a class of ``classes`` not in the image;
- number, ``how many`` ("how many sneakers are there?"): the answer value (0..4, 0 = an absent class) is drawn with
  the weights ``NUMBER_WEIGHTS`` among the values the image offers, which evens out the answers;
- other (sub-kinds drawn with the weights ``OTHER_MIX`` among those the image offers): ``what is in the`` ("what is in
  the top left corner?" for an occupied corner cell, "what is in the middle?" for an occupied centre cell); ``what is
  the`` ("what is the largest item?", only when the largest item's size, the longer side of its pixels' box, is at
  least ``LARGEST_RATIO`` times every other item's); ``what is left of the`` / ``right of`` / ``above`` / ``below``
  ("what is left of the sandal?", only for a class that occurs once; the answer is the nearest occupied cell in that
  direction in the same row / column).

Canonical answers are the class names ``CLASS_ANSWERS`` ("t shirt", ..., "ankle boot"), digits "0".."4" and
"yes"/"no": free of punctuation, articles and capitals, so the official evaluator's normalisation leaves them as they
are. Each question has 10 annotators, each of a kind drawn with the rates ``annotators``: ``exact``, the canonical
answer (a class or yes/no answer sometimes with a final period, which every revision of the official evaluator strips
from disagreeing ground truth); ``variant``, a formatting variant that METER's answer normalisation and the current
official evaluator (which normalises disagreeing ground truth fully) map to it ("Sneaker", "a sneaker", "two", "None"
for 0, "Yes!", "t-shirt"; the evaluator's earlier revision only stripped punctuation from ground truth); ``synonym``
("pants", "purse", "boot", "2 sneakers", "yeah"); ``wrong`` (another class, often one in view, the count +-1, the
opposite yes/no). A question's annotators are redrawn until at least ``MIN_AGREEING`` of them are ``exact`` and the
canonical answer is the strict majority after METER's normalisation, so a perfect model scores 100% under either
revision and ``multiple_choice_answer`` (VQAv2's most common answer, METER-normalised) is the canonical answer.
``answer_confidence`` is mostly "yes" for exact and variant answers, more often "maybe" (or "no") for the others.

Idempotent: a split whose manifest records the same parameters and Fashion-MNIST source files (SHA-256) and whose
JSON files and PNGs still hash to the recorded values is left as is.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image

from florence.benchmarks.detection_canvas import (ALPHA_THRESHOLD, SPLITS, CanvasError, background, composite,
                                                  images_hash, item_alpha, item_colour, resolve_classes,
                                                  source_files, tight_box, write_json)
from florence.bundle import sha256_file
from florence.data.errors import DataNotFound
from florence.data.sources import FASHION_MNIST_DIR, FashionMNISTSource
from florence.errors import FlorenceError

GENERATOR_VERSION = 1
NUM_ANNOTATORS = 10
MIN_AGREEING = 4  # annotators giving the canonical answer (up to the official GT processing): a perfect model gets 100%
MAX_COUNT = 4  # "how many" answers are 0..MAX_COUNT
LARGEST_RATIO = 1.3
ANNOTATOR_TRIES = 200
ANSWER_TYPES = ("yes/no", "number", "other")  # the official answer types
DEFAULT_MIX = {"yes/no": 0.31, "number": 0.20, "other": 0.49}
OTHER_MIX = {"position": 0.4, "largest": 0.2, "relation": 0.4}
NUMBER_WEIGHTS = (0.3, 1.0, 1.5, 6.0, 30.0)  # per answer 0..4: rarer counts weigh more, evening out the answers
DEFAULT_ANNOTATORS = {"exact": 0.60, "variant": 0.15, "synonym": 0.12, "wrong": 0.13}
LICENSE = {"name": "MIT (Fashion-MNIST, Zalando SE)",
           "url": "https://github.com/zalandoresearch/fashion-mnist/blob/master/LICENSE"}


class Name(NamedTuple):
    """How a Fashion-MNIST class is answered and named in questions."""

    answer: str  # canonical answer
    singular: str  # "is there a <singular>?"
    plural: str  # "how many <plural> are there?"
    ref: str  # "what is left of the <ref>?"
    synonyms: tuple[str, ...]  # METER-normalised already


NAMES = (
    Name("t shirt", "t-shirt", "t-shirts", "t-shirt", ("tshirt", "tee", "top")),
    Name("trousers", "pair of trousers", "pairs of trousers", "trousers", ("pants", "jeans")),
    Name("pullover", "pullover", "pullovers", "pullover", ("sweater", "jumper")),
    Name("dress", "dress", "dresses", "dress", ("gown", "frock")),
    Name("coat", "coat", "coats", "coat", ("jacket",)),
    Name("sandal", "sandal", "sandals", "sandal", ("sandals", "flip flop", "shoe")),
    Name("shirt", "shirt", "shirts", "shirt", ("blouse", "button up")),
    Name("sneaker", "sneaker", "sneakers", "sneaker", ("shoe", "sneakers", "trainer")),
    Name("bag", "bag", "bags", "bag", ("purse", "handbag")),
    Name("ankle boot", "ankle boot", "ankle boots", "ankle boot", ("boot", "boots", "shoe")),
)
CLASS_ANSWERS = tuple(n.answer for n in NAMES)  # index = Fashion-MNIST label
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
YES_NO_SYNONYMS = {"yes": ("yeah", "yep"), "no": ("nope", "nah")}
QUESTION_TYPES = ("is there a", "how many", "what is in the", "what is the", "what is left of the",
                  "what is right of the", "what is above the", "what is below the")
DIRECTIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (d row, d col)


@dataclass(frozen=True)
class Item:
    """One pasted item: its class (Fashion-MNIST label 0..9), grid cell, top-left corner and pasted side in pixels,
    ``size`` the longer side of its pixels' box (what "largest" compares) and the source item's index."""

    label: int
    row: int
    col: int
    x: int
    y: int
    side: int
    size: int
    source_index: int


@dataclass(frozen=True)
class Question:
    """A question about one image with its canonical answer; ``kind`` is one of exists, count, position, largest,
    relation (the generator's finer kinds), ``question_type`` / ``answer_type`` as in VQAv2's annotations, ``label``
    the class the question names (exists, count, relation) or None."""

    question: str
    answer: str
    answer_type: str
    question_type: str
    kind: str
    label: int | None = None


@dataclass
class VQACanvasSplit:
    """What ``generate`` produced (or found already there).

    Attributes:
        images_dir: the folder of PNGs (pass it as a VQA dataset's ``images``).
        questions, annotations: the VQAv2 JSON files.
        layout: the layout JSON (items and question kinds per image).
        num_images, num_questions: counts.
        skipped: True if an identical split was already there and nothing was written.
    """

    images_dir: Path
    questions: Path
    annotations: Path
    layout: Path
    num_images: int
    num_questions: int
    skipped: bool


def split_paths(out_dir: str | Path, split: str) -> dict[str, Path]:
    """The files of one split: ``questions``, ``annotations``, ``layout``, ``manifest`` and the ``images`` folder."""
    out_dir = Path(out_dir)
    return {"questions": out_dir / f"v2_OpenEnded_fmnist_{split}_questions.json",
            "annotations": out_dir / f"v2_fmnist_{split}_annotations.json",
            "layout": out_dir / f"layout_fmnist_{split}.json", "manifest": out_dir / f"manifest_fmnist_{split}.json",
            "images": out_dir / split}


def image_name(split: str, image_id: int) -> str:
    """The PNG of an image, as VQAv2 names COCO images (``COCO_<data_subtype>_<image_id:012d>``)."""
    return f"COCO_fmnist_{split}_{image_id:012d}.png"


# ---------------------------------------------------------------------------------------------------------- layout
def plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: one dark colour (values 0..0.15) plus pixel noise (std 0.02)."""
    base = rng.uniform(0.0, 0.15, 3)
    return np.clip(base[None, None, :] + rng.normal(0.0, 0.02, (size, size, 3)), 0.0, 1.0)


BACKGROUNDS = {"texture": background, "plain": plain_background}


def render(rng: np.random.Generator, images: np.ndarray, pools: Sequence[np.ndarray], labels: Sequence[int],
           canvas: int, grid: int, scale: tuple[int, int], items: tuple[int, int],
           backdrop: str = "plain") -> tuple[np.ndarray, list[Item]]:
    """One canvas (canvas, canvas, 3) uint8 and its items; see the module docstring.

    ``images`` (N, 28, 28) uint8 is the Fashion-MNIST split, ``pools[c]`` the indices of its items of class ``c``,
    ``labels`` the classes that may be pasted.
    """
    cell = canvas // grid
    count = int(rng.integers(items[0], items[1] + 1))
    chosen = rng.choice(labels, size=min(len(labels), int(rng.integers(2, 4))), replace=False)
    cells = rng.choice(grid * grid, size=count, replace=False)
    placed, alphas, corners, colours = [], [], [], []
    for cell_index in cells:
        label = int(rng.choice(chosen))
        side = int(rng.integers(scale[0], scale[1] + 1))
        index, a, box = _draw_item(rng, images, pools[label], side, label)
        row, col = divmod(int(cell_index), grid)
        x = col * cell + int(rng.integers(0, cell - side + 1))
        y = row * cell + int(rng.integers(0, cell - side + 1))
        placed.append(Item(label, row, col, x, y, side, max(box[2], box[3]), index))
        alphas.append(a)
        corners.append((x, y))
        colours.append(item_colour(rng))
    out, _ = composite(BACKGROUNDS[backdrop](rng, canvas), alphas, corners, colours)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8), placed


def _draw_item(rng: np.random.Generator, images: np.ndarray, pool: np.ndarray, side: int,
               label: int) -> tuple[int, np.ndarray, tuple[int, int, int, int]]:
    """A random item of ``pool`` with some pixels at ``side``: (index, alpha (side, side), its box)."""
    for _ in range(20):
        index = int(pool[rng.integers(len(pool))])
        a = item_alpha(images[index], side)
        box = tight_box(a > 0)
        if box is not None:
            return index, a, box
    raise CanvasError(f"class {CLASS_ANSWERS[label]!r}: 20 random items had no pixel above the alpha threshold")


# ------------------------------------------------------------------------------------------------------- questions
def candidate_questions(items: Sequence[Item], grid: int, labels: Sequence[int]) -> list[Question]:
    """Every well-defined question about a layout (``labels``: the classes that may be asked about)."""
    counts = Counter(item.label for item in items)
    out = []
    for label in labels:
        name = NAMES[label]
        article = "an" if name.singular[0] in "aeiou" else "a"
        out.append(Question(f"is there {article} {name.singular}?", "yes" if counts[label] else "no", "yes/no",
                            "is there a", "exists", label))
        if counts[label] <= MAX_COUNT:
            out.append(Question(f"how many {name.plural} are there?", str(counts[label]), "number", "how many",
                                "count", label))
    at = {(item.row, item.col): item for item in items}
    last = grid - 1
    places = {"top left corner": (0, 0), "top right corner": (0, last), "bottom left corner": (last, 0),
              "bottom right corner": (last, last)}
    if grid % 2:
        places["middle"] = (grid // 2, grid // 2)
    for place, cell in places.items():
        if cell in at:
            out.append(Question(f"what is in the {place}?", CLASS_ANSWERS[at[cell].label], "other", "what is in the",
                                "position"))
    sizes = sorted((item.size for item in items), reverse=True)
    if len(sizes) > 1 and sizes[0] >= LARGEST_RATIO * sizes[1]:
        largest = max(items, key=lambda item: item.size)
        out.append(Question("what is the largest item?", CLASS_ANSWERS[largest.label], "other", "what is the",
                            "largest"))
    for item in items:
        if counts[item.label] != 1:
            continue
        for relation, step in DIRECTIONS.items():
            neighbour = _nearest(at, item, step, grid)
            if neighbour is not None:
                out.append(Question(f"what is {relation} the {NAMES[item.label].ref}?",
                                    CLASS_ANSWERS[neighbour.label], "other", f"what is {relation} the", "relation",
                                    item.label))
    return out


def _nearest(at: Mapping[tuple[int, int], Item], item: Item, step: tuple[int, int], grid: int) -> Item | None:
    """The first occupied cell from ``item`` in direction ``step`` (same row or column), or None."""
    row, col = item.row + step[0], item.col + step[1]
    while 0 <= row < grid and 0 <= col < grid:
        if (row, col) in at:
            return at[(row, col)]
        row, col = row + step[0], col + step[1]
    return None


def _open(question: Question, asked: Counter, yes_left: bool) -> bool:
    """Whether a question may be asked next; ``asked`` counts the image's questions so far by (answer type, group),
    ``yes_left`` says whether a yes/no question answered yes is still available. Yes/no answers alternate within an
    image (either first; no opens a pair only if a yes can close it), which balances yes and no."""
    if question.answer_type != "yes/no":
        return True
    yes, no = asked[("yes/no", "yes")], asked[("yes/no", "no")]
    return yes <= no if question.answer == "yes" else no < yes or (no == yes and yes_left)


def _group_weight(answer_type: str, key: str) -> float:
    """A group's weight within its answer type: yes/no answers equal, numbers ``NUMBER_WEIGHTS``, other kinds
    ``OTHER_MIX``."""
    if answer_type == "yes/no":
        return 1.0
    return NUMBER_WEIGHTS[int(key)] if answer_type == "number" else OTHER_MIX[key]


def ask(rng: np.random.Generator, candidates: Sequence[Question], count: int,
        mix: Mapping[str, float]) -> list[Question]:
    """Up to ``count`` distinct questions: each time an answer type by ``mix`` among those left, then a group within
    it (yes/no: the answer, alternating yes and no, see :func:`_open`; number: the answer, weights
    ``NUMBER_WEIGHTS``; other: the kind, weights ``OTHER_MIX``), then a question of the group uniformly."""
    left = list(candidates)
    chosen: list[Question] = []
    asked: Counter = Counter()
    while left and len(chosen) < count:
        yes_left = any(q.answer_type == "yes/no" and q.answer == "yes" for q in left)
        open_ = [q for q in left if _open(q, asked, yes_left)]
        types = [t for t in ANSWER_TYPES if mix.get(t, 0) > 0 and any(q.answer_type == t for q in open_)]
        if not types:
            break
        answer_type = types[_weighted(rng, [mix[t] for t in types])]
        groups: dict[str, list[Question]] = {}
        for q in open_:
            if q.answer_type == answer_type:
                groups.setdefault(q.kind if answer_type == "other" else q.answer, []).append(q)
        keys = list(groups)
        key = keys[_weighted(rng, [_group_weight(answer_type, k) for k in keys])]
        question = groups[key][int(rng.integers(len(groups[key])))]
        chosen.append(question)
        asked[(answer_type, key)] += 1
        left.remove(question)
    return chosen


def _weighted(rng: np.random.Generator, weights: Sequence[float]) -> int:
    p = np.asarray(weights, dtype=float)
    return int(rng.choice(len(p), p=p / p.sum()))


# ------------------------------------------------------------------------------------------------------ annotators
def annotate(rng: np.random.Generator, question: Question, present: Sequence[int],
             rates: Mapping[str, float]) -> list[dict]:
    """The 10 VQAv2 answers ``{"answer", "answer_confidence", "answer_id"}`` of a question (``present``: the image's
    classes); see the module docstring for the annotator model and the redraw rule."""
    kinds = list(DEFAULT_ANNOTATORS)
    p = np.asarray([rates[k] for k in kinds], dtype=float)
    p = p / p.sum()
    canonical = question.answer
    official = {canonical, canonical + "."}
    for _ in range(ANNOTATOR_TRIES):
        drawn = [_annotator_answer(rng, question, kinds[int(rng.choice(len(kinds), p=p))], present)
                 for _ in range(NUM_ANNOTATORS)]
        raws = [raw for raw, _, _ in drawn]
        groups = Counter(key for _, key, _ in drawn)
        runner_up = max((n for key, n in groups.items() if key != canonical), default=0)
        # the official evaluator punctuation-processes the ground truth only when the 10 answers differ
        agreeing = sum(raw in official for raw in raws) if len(set(raws)) > 1 else len(raws) * (raws[0] == canonical)
        if agreeing >= MIN_AGREEING and groups[canonical] > runner_up:
            return [{"answer": raw, "answer_confidence": conf, "answer_id": i + 1}
                    for i, (raw, _, conf) in enumerate(drawn)]
    raise CanvasError(f"annotators: {dict(rates)} rarely give the canonical answer; {ANNOTATOR_TRIES} draws of "
                      f"{NUM_ANNOTATORS} never had {MIN_AGREEING} agreeing for {question.question!r}")


def _annotator_answer(rng: np.random.Generator, question: Question, kind: str,
                      present: Sequence[int]) -> tuple[str, str, str]:
    """One annotator's (raw answer, its METER-normalised form, confidence)."""
    canonical = question.answer
    if kind == "exact":
        period = question.answer_type != "number" and rng.random() < 0.2  # METER keeps a period after a digit
        return canonical + ("." if period else ""), canonical, _confidence(rng, 0.9, 0.0)
    if kind == "variant":
        return _variant(rng, canonical, question.answer_type), canonical, _confidence(rng, 0.9, 0.0)
    if kind == "synonym":
        raw, key = _synonym(rng, question)
        return raw, key, _confidence(rng, 0.7, 0.0)
    wrong = _wrong(rng, question, present)
    raw = _variant(rng, wrong, question.answer_type) if rng.random() < 0.2 else wrong
    return raw, wrong, _confidence(rng, 0.25, 0.15)


def _confidence(rng: np.random.Generator, yes: float, no: float) -> str:
    u = rng.random()
    return "yes" if u < yes else "no" if u < yes + no else "maybe"


def _variant(rng: np.random.Generator, answer: str, answer_type: str) -> str:
    """A formatting variant of a canonical answer that METER's normalisation maps back to it."""
    if answer_type == "yes/no":
        options = [answer.capitalize(), answer.upper(), answer + "!", answer.capitalize() + "."]
    elif answer_type == "number":
        word = NUMBER_WORDS[int(answer)]
        options = [word, word.capitalize()] + (["none", "None"] if answer == "0" else [])
    else:
        article = "the" if answer == "trousers" else "an" if answer[0] in "aeiou" else "a"
        options = [answer.capitalize(), answer.title(), f"{article} {answer}", f"the {answer}"]
        if " " in answer:
            options += [answer.replace(" ", "-"), answer.replace(" ", "-").capitalize()]
    return options[int(rng.integers(len(options)))]


def _synonym(rng: np.random.Generator, question: Question) -> tuple[str, str]:
    """(raw, METER-normalised) synonym of a question's answer."""
    answer = question.answer
    if question.answer_type == "yes/no":
        options = YES_NO_SYNONYMS[answer]
        raw = options[int(rng.integers(len(options)))]
        return raw, raw
    if question.answer_type == "number":  # "2 sneakers", "two sneakers", "no sneakers"
        name = NAMES[question.label]
        noun = name.singular if answer == "1" else name.plural
        lead = ["no" if answer == "0" else answer, NUMBER_WORDS[int(answer)]][int(rng.integers(2))]
        key = f"{'no' if answer == '0' else answer} {noun}".replace("-", " ")
        return f"{lead} {noun}", key
    options = NAMES[CLASS_ANSWERS.index(answer)].synonyms
    raw = options[int(rng.integers(len(options)))]
    return (raw.capitalize() if rng.random() < 0.3 else raw), raw


def _wrong(rng: np.random.Generator, question: Question, present: Sequence[int]) -> str:
    """A disagreeing canonical answer: the opposite yes/no, the count +-1, or another class (often one in view)."""
    answer = question.answer
    if question.answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    if question.answer_type == "number":
        options = [str(v) for v in (int(answer) - 1, int(answer) + 1) if v >= 0]
        return options[int(rng.integers(len(options)))]
    in_view = [CLASS_ANSWERS[c] for c in present if CLASS_ANSWERS[c] != answer]
    options = in_view if in_view and rng.random() < 0.6 else [a for a in CLASS_ANSWERS if a != answer]
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------------------------------------- files
def summarize(annotations: Mapping | str | Path) -> dict:
    """Counts of a VQAv2 annotations dict (or file): ``questions``, ``answer_types`` {type: n}, ``answers``
    {type: {multiple_choice_answer: n}}, ``question_types`` {type: n}."""
    if not isinstance(annotations, Mapping):
        annotations = json.loads(Path(annotations).read_text())
    anns = annotations["annotations"]
    answers: dict[str, Counter] = {}
    for a in anns:
        answers.setdefault(a["answer_type"], Counter())[a["multiple_choice_answer"]] += 1
    return {"questions": len(anns), "answer_types": dict(Counter(a["answer_type"] for a in anns)),
            "answers": {t: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for t, c in answers.items()},
            "question_types": dict(Counter(a["question_type"] for a in anns))}


def _check(split: str, num_images: int, canvas: int, grid: int, scale: tuple[int, int], items: tuple[int, int],
           questions_per_image: int, mix: dict, rates: dict) -> None:
    """Raise CanvasError naming the first invalid parameter."""
    if split not in SPLITS:
        raise CanvasError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if num_images < 1:
        raise CanvasError(f"num_images must be at least 1, got {num_images}")
    if grid < 2 or canvas < grid:
        raise CanvasError(f"grid must be at least 2 and at most canvas ({canvas}), got {grid}")
    if not 1 <= scale[0] <= scale[1] <= canvas // grid:
        raise CanvasError(f"scale must satisfy 1 <= min <= max <= the cell side ({canvas // grid}), got {scale}")
    if not 1 <= items[0] <= items[1] <= grid * grid:
        raise CanvasError(f"items must satisfy 1 <= min_items <= max_items <= {grid * grid} cells, got {items}")
    if not 1 <= questions_per_image < 1000:
        raise CanvasError(f"questions_per_image must be 1..999, got {questions_per_image}")
    if set(mix) - set(ANSWER_TYPES) or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise CanvasError(f"mix: weights per answer type ({', '.join(ANSWER_TYPES)}), non-negative, not all 0; "
                          f"got {mix}")
    if set(rates) != set(DEFAULT_ANNOTATORS) or any(v < 0 for v in rates.values()) or rates["exact"] <= 0:
        raise CanvasError(f"annotators: rates for exactly {', '.join(DEFAULT_ANNOTATORS)}, non-negative, exact > 0; "
                          f"got {rates}")


def _params(split: str, num_images: int, seed: int, canvas: int, grid: int, scale: tuple[int, int],
            items: tuple[int, int], questions_per_image: int, mix: dict, rates: dict, classes: list[int],
            root: Path, backdrop: str) -> dict:
    files = source_files(root, split)
    for f in files:
        if not f.is_file():
            raise DataNotFound(f"Fashion-MNIST file not found: {f} (install the Debian package "
                               "'dataset-fashion-mnist' or pass root=/--root a folder with the four idx .gz files)")
    return {"generator_version": GENERATOR_VERSION, "split": split, "num_images": num_images, "seed": seed,
            "canvas": canvas, "grid": grid, "scale": list(scale), "items": list(items), "background": backdrop,
            "questions_per_image": questions_per_image, "mix": mix, "annotators": rates, "classes": classes,
            "other_mix": OTHER_MIX, "number_weights": list(NUMBER_WEIGHTS), "largest_ratio": LARGEST_RATIO,
            "min_agreeing": MIN_AGREEING, "alpha_threshold": ALPHA_THRESHOLD,
            "source_sha256": {f.name: sha256_file(f) for f in files}}


def _up_to_date(paths: dict[str, Path], params: dict) -> dict | None:
    """The manifest if the split on disk matches ``params`` and its recorded hashes, else None."""
    manifest = paths["manifest"]
    if not manifest.is_file() or not all(paths[k].is_file() for k in ("questions", "annotations", "layout")):
        return None
    try:
        recorded = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return None
    if recorded.get("params") != params:
        return None
    if any(recorded.get(f"{k}_sha256") != sha256_file(paths[k]) for k in ("questions", "annotations", "layout")):
        return None
    names = [image_name(params["split"], i) for i in range(1, params["num_images"] + 1)]
    return recorded if recorded.get("images_sha256") == images_hash(paths["images"], names) else None


def generate(out_dir: str | Path, split: str, num_images: int, seed: int, *, canvas: int = 96, grid: int = 3,
             scale: tuple[int, int] = (16, 32), min_items: int = 2, max_items: int = 5, questions_per_image: int = 5,
             mix: Mapping[str, float] | None = None, annotators: Mapping[str, float] | None = None,
             classes: Sequence[str | int] | None = None, root: str | Path | None = None,
             backdrop: str = "plain") -> VQACanvasSplit:
    """Write (or find up to date) one split of the Fashion-MNIST VQA dataset; see the module docstring.

    Args:
        out_dir: output root (see :func:`split_paths`).
        split: ``train`` (Fashion-MNIST train items) or ``test`` (its test items).
        num_images: images to write (image ids 1..num_images).
        seed: base seed.
        canvas: canvas side in pixels; grid: cells per side (a cell is ``canvas // grid`` pixels).
        scale: (min, max) side of a pasted 28x28 item in pixels, inclusive; at most the cell side.
        min_items, max_items: items per image (each in its own cell).
        questions_per_image: questions per image (fewer only if the image offers fewer).
        mix: weights of the answer types yes/no, number, other (default ``DEFAULT_MIX``; missing types: 0).
        annotators: rates of the annotator kinds exact, variant, synonym, wrong (missing kinds: as in
            ``DEFAULT_ANNOTATORS``).
        classes: paste and ask about only these classes (names or ids 1..10).
        root: Fashion-MNIST folder (default the Debian package's).
        backdrop: "plain" (one dark colour + noise) or "texture" (the detection canvases' textured backgrounds, on
            which the demo tower's frozen features recognise far fewer items).
    """
    mix = {t: float(w) for t, w in (mix if mix is not None else DEFAULT_MIX).items()}
    rates = {k: float(v) for k, v in {**DEFAULT_ANNOTATORS, **(annotators or {})}.items()}
    scale, items = (int(scale[0]), int(scale[1])), (int(min_items), int(max_items))
    _check(split, num_images, canvas, grid, scale, items, questions_per_image, mix, rates)
    labels = [c - 1 for c in resolve_classes(classes)]
    if backdrop not in BACKGROUNDS:
        raise CanvasError(f"backdrop: {backdrop!r} is not one of {sorted(BACKGROUNDS)}")
    root = Path(root if root is not None else FASHION_MNIST_DIR)
    paths = split_paths(out_dir, split)
    params = _params(split, num_images, seed, canvas, grid, scale, items, questions_per_image, mix, rates, labels,
                     root, backdrop)
    recorded = _up_to_date(paths, params)
    if recorded is not None:
        return VQACanvasSplit(paths["images"], paths["questions"], paths["annotations"], paths["layout"], num_images,
                              recorded["num_questions"], skipped=True)

    source = FashionMNISTSource(root, split=split)
    pools = [np.flatnonzero(source.labels == c) for c in range(len(NAMES))]
    missing = [CLASS_ANSWERS[c] for c in labels if pools[c].size == 0]
    if missing:
        raise CanvasError(f"classes: {', '.join(missing)} have no items in {source.files[1]}")
    paths["manifest"].unlink(missing_ok=True)
    paths["images"].mkdir(parents=True, exist_ok=True)
    head = {"info": {"description": "Fashion-MNIST VQA (florence.benchmarks.vqa_canvas)", "version": "1.0",
                     "params": {k: v for k, v in params.items() if k != "source_sha256"}},
            "license": LICENSE, "data_type": "fmnist", "data_subtype": f"fmnist_{split}"}
    questions = {**head, "task_type": "Open-Ended", "questions": []}
    annotations = {**head, "annotations": []}
    layout = {**head, "canvas": canvas, "grid": grid, "images": []}
    digest = hashlib.sha256()
    for image_id in range(1, num_images + 1):
        rng = np.random.default_rng([seed, SPLITS[split], image_id])
        pixels, placed = render(rng, source.images, pools, labels, canvas, grid, scale, items, backdrop)
        asked = ask(rng, candidate_questions(placed, grid, labels), questions_per_image, mix)
        present = sorted({item.label for item in placed})
        name = image_name(split, image_id)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        (paths["images"] / name).write_bytes(buffer.getvalue())
        digest.update(hashlib.sha256(buffer.getvalue()).digest())
        entry = {"image_id": image_id, "file_name": name,
                 "items": [{"answer": CLASS_ANSWERS[it.label], "label": it.label, "row": it.row, "col": it.col,
                            "x": it.x, "y": it.y, "side": it.side, "size": it.size, "source_index": it.source_index}
                           for it in placed], "questions": []}
        for k, q in enumerate(asked):
            qid = image_id * 1000 + k
            questions["questions"].append({"image_id": image_id, "question": q.question, "question_id": qid})
            annotations["annotations"].append({
                "question_id": qid, "image_id": image_id, "question_type": q.question_type,
                "answer_type": q.answer_type, "multiple_choice_answer": q.answer,
                "answers": annotate(rng, q, present, rates)})
            entry["questions"].append({"question_id": qid, "kind": q.kind})
        layout["images"].append(entry)
    _remove_stale(paths["images"], split, num_images)
    for key, data in (("questions", questions), ("annotations", annotations), ("layout", layout)):
        write_json(paths[key], data)
    num_questions = len(questions["questions"])
    hashes = {f"{k}_sha256": sha256_file(paths[k]) for k in ("questions", "annotations", "layout")}
    write_json(paths["manifest"], {"params": params, "num_questions": num_questions, **hashes,
                                    "images_sha256": digest.hexdigest()})
    return VQACanvasSplit(paths["images"], paths["questions"], paths["annotations"], paths["layout"], num_images,
                          num_questions, skipped=False)


def _remove_stale(images_dir: Path, split: str, num_images: int) -> None:
    """Delete images left by an earlier, larger run (ids above ``num_images``)."""
    prefix = f"COCO_fmnist_{split}_"
    for path in images_dir.glob(f"{prefix}*.png"):
        stem = path.stem[len(prefix):]
        if stem.isdigit() and int(stem) > num_images:
            path.unlink()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m florence.benchmarks.vqa_canvas",
                                description="Write the Fashion-MNIST VQA dataset in VQAv2 format.")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--train-images", type=int, default=4000, help="train images (0: none)")
    p.add_argument("--test-images", type=int, default=400, help="test images (0: none)")
    p.add_argument("--questions-per-image", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas", type=int, default=96, help="canvas side in pixels")
    p.add_argument("--grid", type=int, default=3, help="grid cells per side")
    p.add_argument("--scale", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"),
                   help="side of a pasted 28x28 item in pixels")
    p.add_argument("--items", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"), help="items per image")
    p.add_argument("--classes", default=None, help="comma-separated class names or ids 1..10 (default all)")
    p.add_argument("--root", type=Path, default=Path(FASHION_MNIST_DIR), help="Fashion-MNIST idx folder")
    p.add_argument("--background", choices=sorted(BACKGROUNDS), default="plain",
                   help="texture: the detection canvases' backgrounds; plain: one dark colour + noise")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = None if args.classes is None else [c for c in args.classes.split(",") if c.strip()]
    try:
        for split, count in (("train", args.train_images), ("test", args.test_images)):
            if count <= 0:
                continue
            done = generate(args.out, split, count, args.seed, canvas=args.canvas, grid=args.grid,
                            scale=tuple(args.scale), min_items=args.items[0], max_items=args.items[1],
                            questions_per_image=args.questions_per_image, classes=chosen, root=args.root,
                            backdrop=args.background)
            kinds = summarize(done.annotations)["answer_types"]
            shares = ", ".join(f"{t} {100 * kinds.get(t, 0) / done.num_questions:.1f}%" for t in ANSWER_TYPES)
            state = "up to date" if done.skipped else "written"
            print(f"{split}: {done.num_images} images, {done.num_questions} questions {state} ({shares}; "
                  f"{done.questions}, {done.annotations}, {done.images_dir})")
    except FlorenceError as err:
        print(f"vqa_canvas: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""VQA answer normalisation: the official evaluator's tables and steps, and METER's ``normalize_word``.

Source: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at its latest revision (a013f00,
"Fixed processing answers bug", 2021): ``processPunctuation``, ``processDigitArticle`` and their tables. METER
(zdou0830/METER ``meter/utils/glossary.py``) carries the same tables (identical contractions, number map, articles,
punctuation list and regexes) and chains the two steps in ``normalize_word`` plus a final comma removal.

The steps are reproduced verbatim, quirks included:

- :func:`process_punctuation`: for each character of :data:`PUNCTUATION` (in order): if it appears next to a space
  in the *input* (``p + " "`` or ``" " + p``), or the input has a digit-comma-digit run (``"1,000"``), every
  occurrence is deleted; otherwise every occurrence becomes a space. Then periods are deleted by
  :data:`PERIOD_STRIP`, ``(?!<=\\d)(\\.)(?!\\d)``: its intended look-behind "not after a digit" is malformed
  (``(?!<=\\d)`` is a look-*ahead* for the characters ``<=`` and a digit, always true before a period), so a period is
  deleted whenever no digit follows it (``"5."`` -> ``"5"``, ``"2.5"`` kept). The official call passes
  ``re.UNICODE`` (= 32) in the ``count`` position of ``re.sub``, so at most 32 periods are deleted
  (:data:`PERIOD_STRIP_COUNT`).
  The apostrophe and the colon are not in the list (an earlier revision had them): ``"it's"`` stays ``"it's"``.
- :func:`process_digit_article`: lower-case, split on whitespace, number words ``none``/``zero``..``ten`` to digits
  (:data:`MANUAL_MAP`), drop the articles ``a``/``an``/``the``, expand the apostrophe-less contractions
  (:data:`CONTRACTIONS`: ``"dont"`` -> ``"don't"``; its capitalised keys such as ``"Im"`` can never match after
  lower-casing), join with single spaces.
- :func:`normalize_answer` = METER ``normalize_word``: punctuation, then digits/articles, then every comma removed
  (a no-op after the punctuation step, which already removed or replaced all commas; kept for fidelity).

Which strings the official metric processes, and when, is the metric's business: see
:mod:`florence.adapters.vqa_metric`.
"""
from __future__ import annotations

import re

# Apostrophe-less spelling -> contraction (120 entries, official vqaEval.py == METER glossary.py).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",}
MANUAL_MAP: dict[str, str] = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES: tuple[str, ...] = ("a", "an", "the")
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                                "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # verbatim, malformed look-behind included (module docstring)
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PERIOD_STRIP_COUNT = int(re.UNICODE)  # 32: the official periodStrip.sub("", outText, re.UNICODE) passes it as count


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (module docstring): ``"yes."`` -> ``"yes"``, ``"red, white"`` ->
    ``"red white"``, ``"t-shirt"`` -> ``"t shirt"``, ``"1,000"`` -> ``"1000"``, ``"2.5"`` unchanged."""
    out = text
    remove = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if remove or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: ``"Two Dogs"`` -> ``"2 dogs"``, ``"a dog"`` -> ``"dog"``,
    ``"dont know"`` -> ``"don't know"``."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """METER ``glossary.normalize_word``: the answer-vocabulary form of an answer (``"Two."`` -> ``"2"``)."""
    return process_digit_article(process_punctuation(text)).replace(",", "")

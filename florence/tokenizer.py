"""Text tokenization: local byte-level BPE training, the CLIP BPE tokenizer, loading from a directory, fixed-length
batches.

The tokenizer itself is always a ``transformers`` fast tokenizer (never a re-implementation of BPE).
``train_bpe_tokenizer`` builds a RoBERTa-style byte-level BPE from texts with the ``tokenizers`` library, fully
offline, and saves it so that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it. ``clip_tokenizer``
builds CLIP's BPE tokenizer (UniCL's text tokenizer) offline from the merges file that ships inside the
``open_clip`` package (or any copy of it).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, CLIPTokenizer, RobertaTokenizerFast

from florence.errors import FlorenceError

# RoBERTa's special tokens, in RoBERTa's id order: <s>=0, <pad>=1, </s>=2, <unk>=3; <mask> follows.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
_BYTE_ALPHABET_SIZE = 256

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
CLIP_CONTEXT_LENGTH = 77
_CLIP_MERGES = 49152 - 256 - 2  # merges CLIP uses (the file holds more): vocab = 2 x 256 bytes + merges + 2 = 49408


class TokenizerFileError(FlorenceError, FileNotFoundError):
    """A tokenizer file that is missing or unreadable; the message names it."""


def train_bpe_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    min_frequency: int = 2,
):
    """Train a byte-level BPE tokenizer with RoBERTa special tokens and post-processing; save and return it.

    Args:
        texts: training corpus (any iterable of strings).
        out_dir: directory to write ``tokenizer.json`` + ``tokenizer_config.json`` into (created if needed).
        vocab_size: target vocabulary size including the 256 byte symbols and the 5 special tokens.
        min_frequency: minimum pair count for a merge.

    Returns:
        The saved tokenizer, loaded back with ``load_tokenizer(out_dir)``.
    """
    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} specials), "
                         f"got {vocab_size}")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"train_bpe_tokenizer: texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if not texts:
        raise ValueError("train_bpe_tokenizer: got no texts to train on")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(
        sep=("</s>", tok.token_to_id("</s>")), cls_token=("<s>", tok.token_to_id("<s>")),
        trim_offsets=True, add_prefix_space=False,
    )
    hf_tok = RobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        add_prefix_space=False, model_max_length=512,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike):
    """Load a fast tokenizer from a local directory with ``AutoTokenizer`` (never downloads)."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerFileError(f"tokenizer directory {str(path)!r} does not exist")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")):
        raise TokenizerFileError(
            f"{str(path)!r} holds no tokenizer files (tokenizer.json / tokenizer_config.json / vocab.*)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], context_length: int = 77) -> dict[str, torch.Tensor]:
    """Tokenize a batch to fixed length (truncate, then pad to ``context_length``).

    Args:
        tokenizer: a transformers tokenizer (with a pad token).
        texts: list of N strings.
        context_length: output length L, special tokens included.

    Returns:
        ``dict(input_ids=(N, L) int64, attention_mask=(N, L) int64)``.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"tokenize: texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("tokenize: got an empty list of texts")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"tokenize: texts[{i}] is {type(t).__name__}, expected str")
    if context_length < 2:
        raise ValueError(f"tokenize: context_length must be >= 2 (room for the special tokens), got {context_length}")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenize: tokenizer {type(tokenizer).__name__} has no pad token")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length,
                    return_attention_mask=True, return_tensors="pt")
    return dict(input_ids=enc["input_ids"].long(), attention_mask=enc["attention_mask"].long())


def _byte_symbols() -> list[str]:
    """The 256 byte symbols of byte-level BPE in CLIP's vocabulary order: printable Latin-1 bytes stand for
    themselves, the other bytes (control, space, soft hyphen) map to code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = sorted(set(range(256)) - set(printable))
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def clip_bpe_path(bpe_path: str | os.PathLike | None = None) -> Path:
    """The CLIP BPE merges file: ``bpe_path`` if given, else the copy inside the installed ``open_clip`` package
    (located with ``importlib.util.find_spec``; ``open_clip`` is not imported)."""
    if bpe_path is not None:
        path = Path(bpe_path)
        if not path.is_file():
            raise TokenizerFileError(f"CLIP BPE file {str(path)!r} does not exist")
        return path
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / CLIP_BPE_FILE
        if path.is_file():
            return path
    raise TokenizerFileError(f"CLIP BPE file {CLIP_BPE_FILE} not found: install open_clip_torch (it ships the file) "
                             "or pass bpe_path=")


def clip_tokenizer(bpe_path: str | os.PathLike | None = None, context_length: int = CLIP_CONTEXT_LENGTH):
    """CLIP's BPE tokenizer as a transformers fast ``CLIPTokenizer``, built offline from the merges file.

    Vocabulary (49408 ids, the order of OpenAI's CLIP and open_clip's ``SimpleTokenizer``): the 256 byte symbols,
    the same with ``</w>``, the first 48894 merges joined, then ``<|startoftext|>`` = 49406 and
    ``<|endoftext|>`` = 49407. Text is NFC-normalised, whitespace-collapsed and lower-cased (transformers' CLIP
    pipeline; open_clip also runs ``ftfy`` first, which changes only malformed text). Encoding adds
    ``<|startoftext|>`` ... ``<|endoftext|>``; padding repeats ``<|endoftext|>`` (UniCL's tokenizer, which also sets
    ``cls_token`` to it; open_clip pads with 0 instead, a difference nothing reads under causal attention and EOT
    pooling). ``save_pretrained`` writes it like any tokenizer, so a bundle needs nothing at load time.

    Args:
        bpe_path: the gzipped merges file (``bpe_simple_vocab_16e6.txt.gz``); None: the copy in ``open_clip``.
        context_length: ``model_max_length`` of the tokenizer (77 for CLIP / UniCL).
    """
    path = clip_bpe_path(bpe_path)
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise TokenizerFileError(f"CLIP BPE file {str(path)!r} is not a gzipped text file: {e}") from None
    merges = [tuple(line.split()) for line in lines[1:1 + _CLIP_MERGES]]  # line 0 is a version header
    if len(merges) != _CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerFileError(f"CLIP BPE file {str(path)!r} does not hold {_CLIP_MERGES} merges of two symbols")
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), CLIP_SOT, CLIP_EOT]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, bos_token=CLIP_SOT, eos_token=CLIP_EOT,
        unk_token=CLIP_EOT, pad_token=CLIP_EOT, cls_token=CLIP_EOT, model_max_length=context_length,
    )

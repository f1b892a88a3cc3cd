"""METER co-attention model (SPEC §6.2): the fusion layer against transformers' BERT cross-attention layers wired as
METER wires them, padding, dropout, the named configs, a model built on a UniCL bundle, bundles, heads, gradients,
training helpers and the one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

import florence
from florence.adapters import meter as meter_module
from florence.adapters.coattention import CoAttentionFusion, CoAttentionLayer, bert_cross_layer_state_dict
from florence.adapters.meter import MeterConfigError, MeterModel, build_meter
from florence.errors import FlorenceError
from florence.factory import load_model_config
from florence.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

QUESTIONS = ["is there a bag?", "how many sneakers are there?", "what is in the top left corner?",
             "what is left of the sandal?"]
ANSWERS = ["yes", "no", "2", "bag", "sandal"]
SIZES = ["test", "tiny", "small", "base", "large", "huge"]


# -- the fusion layer ---------------------------------------------------------------------------------------------


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights far from the init (biases and LayerNorm affine included), so that a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.1)
                    + (1.0 if name.endswith("norm.weight") else 0.0))


def _extended(mask: torch.Tensor) -> torch.Tensor:
    """METER's ``get_extended_attention_mask``: (B, L) 1 / 0 -> (B, 1, 1, L) additive 0 / finfo.min."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _bert_reference(fusion: CoAttentionFusion, dropout: float) -> tuple[list[BertLayer], list[BertLayer]]:
    """transformers ``BertLayer`` cross-attention layers (eager attention) with ``fusion``'s weights."""
    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, layer_norm_eps=1e-12,
                        is_decoder=True, add_cross_attention=True, attn_implementation="eager")

    def copy(layers):
        out = []
        for ours in layers:
            ref = BertLayer(config)
            ref.load_state_dict(bert_cross_layer_state_dict(ours), strict=True)
            out.append(ref.eval())
        return out

    return copy(fusion.text_layers), copy(fusion.image_layers)


def _meter_wiring(text_layers, image_layers, x, y, text_mask):
    """METER meter_module.infer: both streams from the previous layer's outputs, extended masks (image: all ones)."""
    t_mask = _extended(text_mask)
    i_mask = _extended(torch.ones(y.shape[:2]))
    for text_layer, image_layer in zip(text_layers, image_layers):
        x1 = text_layer(x, t_mask, y, i_mask)
        y1 = image_layer(y, i_mask, x, t_mask)
        x, y = x1, y1
    return x, y


@pytest.fixture(scope="module")
def fusion_pair():
    torch.manual_seed(0)
    fusion = CoAttentionFusion(48, 40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.1)
    _randomise(fusion, seed=1)
    return fusion.eval(), _bert_reference(fusion, dropout=0.1)


def test_fusion_equals_bert_cross_layers_wired_as_meter(fusion_pair):
    fusion, (text_ref, image_ref) = fusion_pair
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 7, 32, generator=g), torch.randn(3, 10, 32, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        ours_x, ours_y = fusion(x, y, text_mask)
        ref_x, ref_y = _meter_wiring(text_ref, image_ref, x, y, text_mask)
    valid = text_mask.bool()
    torch.testing.assert_close(ours_x[valid], ref_x[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_y, ref_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_x, ref_x, rtol=0, atol=1e-5)  # padded queries too (computed, never read)
    # one layer alone, each stream: the same with the other stream as context
    with torch.no_grad():
        torch.testing.assert_close(fusion.image_layers[0](y, x, None, text_mask.bool()[:, None, None, :]),
                                   image_ref[0](y, _extended(torch.ones(3, 10)), x, _extended(text_mask)),
                                   rtol=0, atol=1e-5)


def test_padded_text_tokens_are_never_attended(fusion_pair):
    fusion, _ = fusion_pair
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    noisy = torch.where(text_mask.bool()[..., None], x, 100 * torch.randn(2, 6, 32, generator=g))
    with torch.no_grad():
        x_a, y_a = fusion(x, y, text_mask)
        x_b, y_b = fusion(noisy, y, text_mask)
        x_c, y_c = fusion(x, y, None)
    valid = text_mask.bool()
    torch.testing.assert_close(x_b[valid], x_a[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(y_b, y_a, rtol=0, atol=1e-5)
    assert (y_c - y_a).abs().max() > 1e-3  # without the mask the padding does count


def test_dropout_is_berts_and_only_in_training():
    torch.manual_seed(0)
    layer = CoAttentionLayer(32, 4, 64, dropout=0.5)
    x, y = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    layer.eval()
    torch.testing.assert_close(layer(x, y), layer(x, y), rtol=0, atol=0)
    layer.train()
    assert (layer(x, y) - layer(x, y)).abs().max() > 1e-3
    blocks = (layer.self_attn, layer.cross_attn, layer.ffn)
    for block in blocks:  # the attention-probability dropout alone acts too
        block.proj_drop = 0.0
    assert (layer(x, y) - layer(x, y)).abs().max() > 1e-3
    for block in blocks:
        block.proj_drop = 0.5
    # same weights, dropout 0 in training == eval
    plain = CoAttentionLayer(32, 4, 64, dropout=0.0).train()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(plain(x, y), layer.eval()(x, y), rtol=0, atol=1e-6)
    # the hidden dropouts are BERT's: with the same RNG draws, training mode equals transformers' BertLayer (attention
    # dropout off on both sides: SDPA and eager attention draw their masks differently)
    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.5,
                        attention_probs_dropout_prob=0.0, is_decoder=True, add_cross_attention=True,
                        attn_implementation="eager")
    ref = BertLayer(config).train()
    ref.load_state_dict(bert_cross_layer_state_dict(layer))
    layer.train()
    layer.self_attn.attn_drop = layer.cross_attn.attn_drop = 0.0
    zeros = torch.zeros(2, 1, 1, 6), torch.zeros(2, 1, 1, 5)
    torch.manual_seed(7)
    expected = ref(x, zeros[0], y, zeros[1])
    torch.manual_seed(7)
    torch.testing.assert_close(layer(x, y), expected, rtol=0, atol=1e-5)


def test_state_dict_in_bert_layout_covers_every_weight():
    layer = CoAttentionLayer(32, 4, 64)
    keys = set(bert_cross_layer_state_dict(layer))
    ref = BertLayer(BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, is_decoder=True,
                               add_cross_attention=True))
    assert keys == set(ref.state_dict())
    assert sum(v.numel() for v in bert_cross_layer_state_dict(layer).values()) == sum(
        p.numel() for p in layer.parameters())


def test_meter_init():
    torch.manual_seed(0)
    fusion = CoAttentionFusion(768, 1024, num_layers=1)
    linears = [m for m in fusion.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 2e-4 and abs(weights.mean().item()) < 1e-4
    norms = [m for m in fusion.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 6 and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)


# -- the model ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    """A tiny UniCL dual encoder with a tokenizer, and its bundle directory."""
    root = tmp_path_factory.mktemp("dual")
    train_bpe_tokenizer(QUESTIONS * 5, root / "tok", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = florence.create_model("unicl_test", tokenizer=str(root / "tok"))
    model.save_pretrained(root / "bundle")
    return model, root / "bundle"


def _meter(dual_model, **overrides):
    torch.manual_seed(1)
    overrides = {"answers": ANSWERS, "max_text_len": 16, **overrides}
    return florence.create_model("meter_coswin_test", backbone=dual_model, **overrides)


def _inputs(model, n: int = 4):
    images = torch.randn(n, *model.preprocess["input_size"], generator=torch.Generator().manual_seed(5))
    return images, model.tokenize((QUESTIONS * 2)[:n])


def test_named_configs():
    assert set(florence.list_models("meter_coswin_*")) == {f"meter_coswin_{s}" for s in SIZES}
    widths = {"test": 256, "tiny": 768, "small": 768, "base": 1024, "large": 1536, "huge": 2816}
    for size in SIZES:
        config = load_model_config(f"meter_coswin_{size}")
        assert config["architecture"] == "meter" and config["heads"] == ["vqa"] and config["max_text_len"] == 40
        with torch.device("meta"):
            model = florence.create_model(f"meter_coswin_{size}", answers=ANSWERS)
        f = model.fusion_cfg
        if size == "test":
            assert (f["hidden_size"], f["num_layers"], f["num_heads"]) == (32, 1, 4)
            assert model.text_encoder.config.hidden_size == 64
        else:  # METER's fusion, RoBERTa-base text
            assert (f["hidden_size"], f["num_layers"], f["num_heads"], f["intermediate_size"]) == (768, 6, 12, 3072)
            assert f["dropout"] == 0.1 and model.text_encoder.config.num_hidden_layers == 12
            assert model.text_encoder.config.vocab_size == 50265 and model.preprocess["input_size"] == [3, 384, 384]
            assert model.image_encoder.florence_config["name"] == f"coswin_{size}"
        assert len(model.fusion.text_layers) == len(model.fusion.image_layers) == f["num_layers"]
        assert model.fusion.image_proj.in_features == widths[size]
        assert model.vqa_head[-1].out_features == len(ANSWERS)


def test_built_on_a_dual_encoder_takes_both_towers_and_the_tokenizer(dual):
    dual_model, bundle = dual
    model = _meter(dual_model)
    assert model.image_encoder is dual_model.image_encoder and model.text_encoder is dual_model.text_encoder.encoder
    assert model.tokenizer is dual_model.tokenizer and model.preprocess == dual_model.preprocess
    assert model.pad_token_id == 1 and model.mask_token_id == dual_model.tokenizer.mask_token_id == 4
    assert model.vocab_size == 512 and model.num_answers == 5 and model.heads == ["vqa"]
    batch = model.tokenize(["is there a bag?"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (1, 16)
    # a bundle directory: the towers carry the bundle's weights
    from_dir = build_meter(load_model_config("meter_coswin_test") | {"answers": ANSWERS}, backbone=bundle)
    for key, value in dual_model.image_encoder.state_dict().items():
        assert torch.equal(from_dir.image_encoder.state_dict()[key], value), key
    for key, value in dual_model.text_encoder.encoder.state_dict().items():
        assert torch.equal(from_dir.text_encoder.state_dict()[key], value), key
    assert from_dir.tokenizer is not None and from_dir.preprocess == dual_model.preprocess


def test_without_a_backbone_the_towers_come_from_the_config(dual, tmp_path):
    """Random towers from the named config, or a local transformers directory as the text tower (its tokenizer
    with it)."""
    dual_model, _ = dual
    fresh = florence.create_model("meter_coswin_test", answers=ANSWERS)
    assert fresh.tokenizer is None and fresh.text_encoder.config.num_hidden_layers == 2
    with pytest.raises(MeterConfigError, match="no tokenizer"):
        fresh.tokenize(["a"])
    dual_model.text_encoder.encoder.save_pretrained(tmp_path / "roberta")
    dual_model.tokenizer.save_pretrained(tmp_path / "roberta")
    model = florence.create_model("meter_coswin_test", answers=ANSWERS, text={"pretrained": str(tmp_path / "roberta")})
    for key, value in dual_model.text_encoder.encoder.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[key], value), key
    assert model.tokenize(["is there a bag?"])["input_ids"].shape == (1, 40)


def test_create_model_takes_a_dual_encoder_bundle_directory(dual):
    _, bundle = dual
    model = florence.create_model("meter_coswin_test", backbone=str(bundle), answers=ANSWERS)
    assert isinstance(model, MeterModel) and model.tokenizer is not None and model.training
    assert model.text_encoder.config.hidden_size == 64 and model.preprocess["input_size"] == [3, 56, 56]


def test_forward_shapes_and_the_dict_splits_along_the_batch(dual):
    model = _meter(dual[0], heads=["vqa", "itm", "mlm"]).eval()
    images, batch = _inputs(model)
    with torch.no_grad():
        out = model(images, **batch)
        halves = [model(images[s], batch["input_ids"][s], batch["attention_mask"][s]) for s in (slice(0, 1),
                                                                                             slice(1, 4))]
        feats = model.encode(images, **batch)
    assert out["cls_feats"].shape == (4, 64) and out["vqa_logits"].shape == (4, 5)
    assert out["itm_logits"].shape == (4, 2) and out["mlm_logits"].shape == (4, 16, 512)
    for key, value in out.items():
        torch.testing.assert_close(torch.cat([h[key] for h in halves]), value, rtol=0, atol=1e-5)
    assert feats["text_feats"].shape == (4, 16, 32) and feats["image_feats"].shape == (4, 4, 32)  # 56 px: 2x2
    torch.testing.assert_close(feats["cls_feats"], out["cls_feats"])


def test_projection_token_types_and_poolers_without_co_attention(dual):
    """num_layers 0 (the baseline): cls_feats by hand from the towers' outputs."""
    dual_model = dual[0]
    model = _meter(dual_model, fusion={"num_layers": 0}).eval()
    assert len(model.fusion.text_layers) == 0
    images, batch = _inputs(model, 2)
    with torch.no_grad():
        text = dual_model.text_encoder.encoder(**batch).last_hidden_state[:, 0]  # B, 64 (token 0)
        image = dual_model.image_encoder.forward_features(images).flatten(1, 2)  # B, N, 256
        f, types = model.fusion, model.token_type_embeddings.weight
        text_token0 = text @ f.text_proj.weight.T + f.text_proj.bias + types[0]
        text_pooled = torch.tanh(text_token0 @ f.text_pooler.dense.weight.T + f.text_pooler.dense.bias)
        image_mean = (image @ f.image_proj.weight.T + f.image_proj.bias + types[1]).mean(1)
        image_pooled = torch.tanh(image_mean @ f.image_pooler.dense.weight.T + f.image_pooler.dense.bias)
        out = model(images, **batch)
    torch.testing.assert_close(out["cls_feats"], torch.cat([text_pooled, image_pooled], -1), rtol=1e-5, atol=1e-6)
    head = model.vqa_head
    expected = head[3](F.gelu(F.layer_norm(head[0](out["cls_feats"]), (64,), head[1].weight, head[1].bias)))
    torch.testing.assert_close(out["vqa_logits"], expected)


def test_image_position_table_is_added_per_token_and_resized(dual):
    """image_pos_grid k: token (i, j) of the image grid gets entry (i, j) of the k x k table; another grid size gets
    the table resized bilinearly (F.interpolate, align_corners=False); k = 0 adds nothing."""
    model = _meter(dual[0], fusion={"num_layers": 0, "image_pos_grid": 2}).eval()
    f = model.fusion
    y = torch.randn(1, 4, f.hidden_size)
    torch.testing.assert_close(f.add_image_positions(y, (2, 2))[0, 3], y[0, 3] + f.image_pos[0, :, 1, 1])
    resized = F.interpolate(f.image_pos, size=(3, 1), mode="bilinear", align_corners=False)  # 1, h, 3, 1
    y3 = torch.zeros(1, 3, f.hidden_size)
    torch.testing.assert_close(f.add_image_positions(y3, (3, 1))[0, 1], resized[0, :, 1, 0])
    plain = _meter(dual[0], fusion={"num_layers": 0})
    assert plain.fusion.image_pos is None and torch.equal(plain.fusion.add_image_positions(y, (2, 2)), y)
    images, batch = _inputs(model, 2)
    with torch.no_grad():  # the table reaches the image pooler's mean
        before = model(images, **batch)["cls_feats"]
        f.image_pos.add_(1.0)
        after = model(images, **batch)["cls_feats"]
    assert torch.equal(before[:, :f.hidden_size], after[:, :f.hidden_size])  # text half unchanged without layers
    assert not torch.allclose(before[:, f.hidden_size:], after[:, f.hidden_size:])


def test_mlm_decoder_is_the_text_embedding_matrix(dual):
    model = _meter(dual[0], heads=["mlm"]).eval()
    images, batch = _inputs(model, 2)
    words = model.text_encoder.get_input_embeddings().weight
    head = model.mlm_head
    with torch.no_grad():
        feats = model.encode(images, **batch)["text_feats"]
        transformed = F.layer_norm(F.gelu(head.dense(feats)), (64,), head.norm.weight, head.norm.bias, 1e-12)
        torch.testing.assert_close(model(images, **batch)["mlm_logits"], transformed @ words.T + head.bias)
    assert head.dense.out_features == 64 and head.bias.shape == (512,)
    assert not any("decoder" in k for k in model.state_dict())  # one copy of the matrix


def test_every_parameter_gets_a_gradient(dual):
    model = _meter(dual[0], heads=["vqa", "itm", "mlm"], fusion={"num_layers": 2, "dropout": 0.1}).train()
    images, batch = _inputs(model)
    out = model(images, **batch)
    loss = sum(v.float().pow(2).mean() for v in out.values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    for prefix in ("image_encoder.", "text_encoder.", "fusion.text_layers.", "fusion.image_layers.",
                   "token_type_embeddings.", "vqa_head.", "itm_head.", "mlm_head."):
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith(prefix)), prefix
    model.zero_grad()


def test_bundle_round_trip(dual, tmp_path):
    model = _meter(dual[0], heads=["vqa", "itm", "mlm"], fusion={"num_layers": 2}).eval()
    images, batch = _inputs(model)
    with torch.no_grad():
        expected = model(images, **batch)
    model.save_pretrained(tmp_path / "meter")
    assert json.loads((tmp_path / "meter" / "answers.json").read_text()) == ANSWERS
    assert (tmp_path / "meter" / "tokenizer" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "meter" / "config.json").read_text())
    assert config["architecture"] == "meter" and config["model"]["heads"] == ["vqa", "itm", "mlm"]
    assert config["model"]["image"] == {"model": "coswin_test"} and config["model"]["text"]["hidden_size"] == 64
    assert set(load_file(str(tmp_path / "meter" / "model.safetensors"))) == set(model.state_dict())
    loaded = florence.from_pretrained(tmp_path / "meter")
    assert isinstance(loaded, MeterModel) and not loaded.training
    assert loaded.answers == ANSWERS and loaded.heads == ["vqa", "itm", "mlm"] and loaded.max_text_len == 16
    assert loaded.fusion_cfg == model.fusion_cfg and loaded.preprocess == model.preprocess
    assert torch.equal(loaded.tokenize(QUESTIONS)["input_ids"], model.tokenize(QUESTIONS)["input_ids"])
    with torch.no_grad():
        out = loaded(images, **batch)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)
    with torch.no_grad():  # still tied after loading
        loaded.text_encoder.get_input_embeddings().weight[7] += 1.0
        assert not torch.allclose(loaded(images, **batch)["mlm_logits"], out["mlm_logits"])


def test_set_heads_replaces_the_heads(dual):
    model = _meter(dual[0], heads=["itm", "mlm"], answers=None)
    assert model.answers is None and not hasattr(model, "vqa_head") and model.num_answers == 0
    model.set_heads(["vqa"], answers=["a", "b", "c"])
    assert model.heads == ["vqa"] and model.answers == ["a", "b", "c"]
    assert not hasattr(model, "itm_head") and not hasattr(model, "mlm_head")
    assert not any(k.startswith(("itm_head", "mlm_head")) for k in model.state_dict())
    assert model.vqa_head[-1].out_features == 3 and torch.count_nonzero(model.vqa_head[-1].bias) == 0
    model.set_heads(["vqa", "itm"])  # the vocabulary stays
    assert model.answers == ["a", "b", "c"] and model.itm_head.out_features == 2


def test_answer_is_the_top_k_of_the_sigmoid(dual):
    model = _meter(dual[0]).eval()
    images, batch = _inputs(model, 3)
    scores, indices = model.answer(images, batch["input_ids"], batch["attention_mask"], k=2)
    with torch.no_grad():
        probs = torch.sigmoid(model(images, **batch)["vqa_logits"])
    assert scores.shape == indices.shape == (3, 2)
    torch.testing.assert_close(scores, probs.gather(1, indices))
    assert torch.equal(indices[:, 0], probs.argmax(1)) and bool((scores[:, 0] >= scores[:, 1]).all())
    assert model.answer(images, batch["input_ids"], batch["attention_mask"], k=50)[0].shape == (3, 5)


def test_training_helpers(dual):
    model = _meter(dual[0], heads=["vqa", "mlm"], fusion={"num_layers": 2})
    skip = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert skip <= set(names) and all(names[n].ndim <= 1 for n in skip if not n.endswith("bias_table"))
    assert {n for n, p in names.items() if p.ndim <= 1} <= skip
    assert any(n.endswith("relative_position_bias_table") for n in skip)
    assert "fusion.text_layers.0.self_attn.qkv.weight" not in skip and "mlm_head.bias" in skip

    units = model.fsdp_wrap_modules()
    assert all(layer in units for layer in [*model.fusion.text_layers, *model.fusion.image_layers])
    assert model.image_encoder in units and model.text_encoder not in units
    words = model.text_encoder.get_input_embeddings()
    assert not any(words in list(unit.modules()) for unit in units)
    assert sum(type(u).__name__ == "RobertaLayer" for u in units) == 2

    model.train()
    images, batch = _inputs(model, 2)
    torch.manual_seed(3)
    plain = model(images, **batch)["vqa_logits"]
    grads = torch.autograd.grad(plain.sum(), model.fusion.text_layers[0].self_attn.qkv.weight)[0]
    model.set_grad_checkpointing(True)
    assert model.fusion.grad_checkpointing
    torch.manual_seed(3)
    checked = model(images, **batch)["vqa_logits"]
    grads_checked = torch.autograd.grad(checked.sum(), model.fusion.text_layers[0].self_attn.qkv.weight)[0]
    torch.testing.assert_close(checked, plain)
    torch.testing.assert_close(grads_checked, grads)
    model.set_grad_checkpointing(False)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, FlorenceError) and "\n" not in message
    return message


@pytest.mark.parametrize("overrides, match", [
    ({"heads": ["vqa", "caption"]}, "unknown or repeated head"),
    ({"heads": ["vqa"], "answers": None}, "needs answers"),
    ({"fusion": {"num_layer": 2}}, r"unknown keys \['num_layer'\]"),
    ({"fusion": {"hidden_size": 30}}, "multiple of num_heads"),
    ({"answers": ["yes", "no", "yes"]}, "'yes' occurs twice"),
    ({"max_text_len": 200}, "max_text_len=200"),
    ({"colour": 1}, r"unknown keys \['colour'\]"),
    ({"preprocess": {"size": 3}}, "meter preprocess: unknown keys"),
])
def test_bad_configs_raise_one_line_errors(dual, overrides, match):
    with pytest.raises(MeterConfigError, match=match) as excinfo:
        _meter(dual[0], **overrides)
    _one_line(excinfo)


def test_a_backbone_that_is_not_a_dual_encoder_is_refused(dual):
    tower = florence.create_model("coswin_test")
    with pytest.raises(MeterConfigError, match="not a dual encoder") as excinfo:
        build_meter(load_model_config("meter_coswin_test") | {"answers": ANSWERS}, backbone=tower)
    _one_line(excinfo)
    model = _meter(dual[0], heads=["itm"], answers=None)
    images, batch = _inputs(model, 1)
    with pytest.raises(MeterConfigError, match="no VQA head"):
        model.answer(images, batch["input_ids"], batch["attention_mask"])
    assert meter_module.HEAD_NAMES == ("vqa", "itm", "mlm")

"""UniCL release -> florence bundle (backbone/unicl_convert.py), the CLIP BPE tokenizer and EOT pooling.

The source is a tiny state dict in UniCL's layout built from the public definitions, random weights throughout:
the image encoder is timm's SwinTransformer written out under the official Swin names (patch merging at the end of
a stage, ``relative_position_index`` / ``attn_mask`` buffers), the text encoder a CLIP-style transformer of plain
torch modules named as UniCL names them (``resblocks.N.attn`` = ``nn.MultiheadAttention``, ``mlp.c_fc``, ...).
The references never touch our modules: timm's SwinTransformer loaded from the official keys through timm's own
``checkpoint_filter_fn``, and a plain-torch forward of SPEC §2.2 (causal mask only, LayerNorm eps 1e-12, QuickGELU,
hidden state at argmax(input_ids), @ text_projection, L2 norm).
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from florence.backbone.text_tower import TextTower
from florence.benchmarks.convert_cli import main as convert_main
from florence.backbone.unicl_convert import UNICL_EVAL_PREPROCESS, UniCLConvertError, convert_unicl
from florence.bundle import from_pretrained, save_pretrained
from florence.factory import create_model
from florence.tokenizer import TokenizerFileError, clip_bpe_path, clip_tokenizer, tokenize
from florence.weights import WeightsError

timm_swin = pytest.importorskip("timm.models.swin_transformer")

SIZE, WINDOW = 64, 4  # stages 16, 8, 4, 2: shifted windows in 1-2, no shift in 3 (4 = window), clamped window in 4
SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=WINDOW)
VOCAB, WIDTH, LAYERS, HEADS, CONTEXT, DIM = 49408, 64, 2, 4, 77, 24  # CLIP's vocabulary and context length
PREPROCESS = dict(input_size=[3, SIZE, SIZE], mean=[0.48, 0.45, 0.4], std=[0.27, 0.26, 0.27],
                  interpolation="bicubic", crop_pct=1.0)
SENTENCES = [
    "a photo of a cat.", "A Dog's   life, isn't it?", "the quick brown fox jumps over the lazy dog 12345!",
    "an origami airplane on a table", "itap of my ship", "a sketch of a horse", "café au lait, naïve",
    "two\ttabs and\nnewlines", "word " * 100,  # truncated to 77 tokens
]


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _clip_block(width: int, heads: int) -> nn.Module:
    block = nn.Module()
    block.ln_1 = nn.LayerNorm(width, eps=1e-12)
    block.attn = nn.MultiheadAttention(width, heads)
    block.ln_2 = nn.LayerNorm(width, eps=1e-12)
    block.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                          c_proj=nn.Linear(4 * width, width)))
    return block


class UniCLTextReference(nn.Module):
    """SPEC §2.2 written out: token + learned positional embedding, pre-LN blocks with a causal mask (no padding
    mask), final LayerNorm, the state at argmax(input_ids); parameter names are UniCL's."""

    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        self.resblocks = nn.ModuleList(_clip_block(WIDTH, HEADS) for _ in range(LAYERS))
        self.ln_final = nn.LayerNorm(WIDTH, eps=1e-12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        causal = torch.full((L, L), float("-inf")).triu(1)
        x = (self.token_embedding(ids) + self.positional_embedding[:L]).transpose(0, 1)  # L, B, W
        for b in self.resblocks:
            h = b.ln_1(x)
            x = x + b.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
            x = x + b.mlp(b.ln_2(x))
        x = self.ln_final(x.transpose(0, 1))  # B, L, W
        return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)]  # B, W


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:  # LayerNorm weights around 1, biases around 0
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(noise * 0.5 / p.shape[-1] ** 0.5)


def _timm_swin() -> nn.Module:
    return timm_swin.SwinTransformer(img_size=SIZE, patch_size=4, num_classes=0, **SWIN).eval()


def _official_swin_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """timm keys -> the official Swin layout: downsample back to the end of the previous stage; buffers added."""
    state = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", k)
        state[k] = v.clone()
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = block.attn.relative_position_index.clone()
            if block.attn_mask is not None:
                state[f"layers.{i}.blocks.{j}.attn_mask"] = block.attn_mask.clone()
    return state


@pytest.fixture(scope="module")
def source():
    """(UniCL-layout state dict, timm image model, text reference, projections)."""
    gen = torch.Generator().manual_seed(0)
    image, text = _timm_swin(), UniCLTextReference().eval()
    _randomise(image, gen)
    _randomise(text, gen)
    state = {f"image_encoder.{k}": v for k, v in _official_swin_state(image).items()}
    state |= {f"text_encoder.{k}": v.clone() for k, v in text.state_dict().items()}
    state["text_projection"] = torch.randn(WIDTH, DIM, generator=gen) * 0.1
    state["image_projection"] = torch.randn(image.num_features, DIM, generator=gen) * 0.1
    state["logit_scale"] = torch.tensor(2.5)
    assert "image_encoder.layers.0.downsample.reduction.weight" in state  # the official layout
    assert state["image_encoder.layers.3.blocks.0.attn.relative_position_bias_table"].shape[0] == 9  # clamped 2x2
    return state, text


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    state, _ = source
    path = tmp_path_factory.mktemp("unicl") / "unicl.pth"
    torch.save({"model": state, "epoch": 3}, path)  # the released files' wrapper
    return convert_unicl(path, preprocess=PREPROCESS, text_heads=HEADS)


def _reference_image(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    ref = _timm_swin()
    official = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    ref.load_state_dict(timm_swin.checkpoint_filter_fn(official, ref))  # strict: timm's own official -> timm map
    with torch.no_grad():
        pooled = ref.forward_head(ref.forward_features(images), pre_logits=True)  # B, 8C
    return F.normalize(pooled @ state["image_projection"], dim=-1)


def _reference_text(source, ids: torch.Tensor) -> torch.Tensor:
    state, text = source
    with torch.no_grad():
        return F.normalize(text(ids) @ state["text_projection"], dim=-1)


def test_image_embeddings_equal_timm_reference(source, converted):
    model, report = converted
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encode_image(images)
    diff = (ours - _reference_image(source[0], images)).abs().max().item()
    assert diff <= 1e-5, diff
    assert "image_encoder.layers.1.downsample.reduction.weight" in report.loaded  # moved to the next stage
    assert "image_encoder.layers.3.blocks.0.attn.relative_position_bias_table" in report.resized  # centred 3x3
    assert any(k.endswith("attn_mask") for k in report.skipped)
    assert any(k.endswith("relative_position_index") for k in report.skipped)


def test_text_embeddings_equal_spec_reference(source, converted):
    model, _ = converted
    batch = model.tokenize(SENTENCES)  # padding repeats <|endoftext|>, with attention_mask = 0 there
    assert batch["input_ids"].shape == (len(SENTENCES), CONTEXT)
    random_ids = torch.randint(0, VOCAB - 2, (3, CONTEXT), generator=torch.Generator().manual_seed(2))
    random_ids[:, 0], random_ids[0, 5:], random_ids[1, 40:], random_ids[2, -1] = VOCAB - 2, VOCAB - 1, VOCAB - 1, \
        VOCAB - 1
    eot = random_ids.argmax(dim=1, keepdim=True)
    mask = (torch.arange(CONTEXT) <= eot).long()  # 1 up to the first <|endoftext|>, 0 on the padding after it
    with torch.no_grad():
        ours = model.encode_text(**batch)
        ours_random = model.encode_text(random_ids, mask)
        ours_unmasked = model.encode_text(random_ids)
    diffs = [(ours - _reference_text(source, batch["input_ids"])).abs().max().item(),
             (ours_random - _reference_text(source, random_ids)).abs().max().item(),
             (ours_unmasked - _reference_text(source, random_ids)).abs().max().item()]
    assert max(diffs) <= 1e-5, diffs


def test_report_config_and_logit_scale(source, converted):
    model, report = converted
    assert not report.missing and not report.unexpected and not report.newly_initialized
    assert "text_encoder.encoder.encoder.layers.1.self_attn.v_proj.bias" in report.loaded
    assert {"logit_scale", "image_projection.weight", "text_encoder.projection.weight"} <= set(report.loaded)
    assert model.logit_scale.item() == pytest.approx(2.5)
    text = model.config["text"]
    assert (text["model_type"], text["pooling"], text["hidden_act"], text["layer_norm_eps"]) == \
        ("clip_text_model", "eot", "quick_gelu", 1e-12)
    assert (text["vocab_size"], text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["max_position_embeddings"], text["pad_token_id"], text["eos_token_id"]) == \
        (VOCAB, WIDTH, LAYERS, HEADS, CONTEXT, VOCAB - 1, VOCAB - 1)
    image = model.config["image"]
    assert (image["embed_dim"], image["depths"], image["num_heads"], image["window_size"], image["embed"]) == \
        (16, [2, 2, 2, 2], [2, 2, 4, 4], WINDOW, "patch")
    assert model.preprocess == PREPROCESS and model.embed_dim == DIM and model.context_length == CONTEXT


def test_bundle_round_trip(converted, tmp_path):
    model, _ = converted
    save_pretrained(model, tmp_path / "bundle")
    loaded = from_pretrained(tmp_path / "bundle").eval()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    batch = loaded.tokenize(SENTENCES[:3])  # the tokenizer came back from the bundle
    assert torch.equal(batch["input_ids"], model.tokenize(SENTENCES[:3])["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(**batch), model.encode_text(**batch))
    assert loaded.text_encoder.pooling == "eot" and loaded.config == model.config


def test_florence_convert_writes_the_converted_model(source, converted, tmp_path, capsys):
    state, _ = source
    path = tmp_path / "unicl.pth"
    torch.save({"model": state}, path)
    argv = ["--from", "unicl", str(path), str(tmp_path / "bundle"), "--text-heads", str(HEADS)]
    assert convert_main(argv) == 2  # UniCL checkpoints do not record preprocessing: refused, not guessed
    assert "--preprocess unicl" in capsys.readouterr().err
    assert convert_main([*argv, "--preprocess", json.dumps(PREPROCESS)]) == 0
    assert "loaded" in capsys.readouterr().out
    loaded, (model, _) = from_pretrained(tmp_path / "bundle"), converted
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    batch = model.tokenize(SENTENCES[:2])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(**batch), model.encode_text(**batch))


def test_clip_tokenizer_equals_open_clip_simple_tokenizer():
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    reference = open_clip_tokenizer.SimpleTokenizer()
    tok = clip_tokenizer()
    assert len(tok) == VOCAB and tok.pad_token_id == tok.eos_token_id == tok.cls_token_id == VOCAB - 1
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's spelling
    assert tok.get_vocab() == {names.get(t, t): i for t, i in reference.encoder.items()}
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    texts = SENTENCES + [template(name) for name, template in
                         zip(metadata.IMAGENET_CLASSNAMES, metadata.OPENAI_IMAGENET_TEMPLATES * 20)]
    for text in texts:  # 1009 sentences: the ImageNet class names in CLIP's prompt templates
        assert tok(text, add_special_tokens=False)["input_ids"][:75] == reference.encode(text)[:75], text
    ours, ref = tokenize(tok, SENTENCES, CONTEXT), reference(SENTENCES, context_length=CONTEXT)
    # identical up to and including <|endoftext|>; open_clip pads with 0, UniCL (and we) with <|endoftext|>
    assert torch.equal(torch.where(ours["attention_mask"].bool(), ours["input_ids"], 0), ref)
    assert (ours["input_ids"][ours["attention_mask"] == 0] == VOCAB - 1).all()


def test_clip_tokenizer_file_errors(tmp_path):
    assert clip_bpe_path().name == "bpe_simple_vocab_16e6.txt.gz"
    with pytest.raises(TokenizerFileError, match="nope.gz"):
        clip_tokenizer(tmp_path / "nope.gz")
    (tmp_path / "bad.gz").write_text("not gzip")
    with pytest.raises(TokenizerFileError, match="bad.gz"):
        clip_tokenizer(tmp_path / "bad.gz")


def _convert(state, **kwargs):
    return convert_unicl(state, **{"preprocess": PREPROCESS, "text_heads": HEADS, **kwargs})


@pytest.mark.parametrize("key", ["image_encoder.layers.0.blocks.0.attn.extra", "text_encoder.resblocks.0.ln_3.weight",
                                 "vision_projection"])
def test_strict_conversion_names_a_stray_key(source, key):
    state = {**source[0], key: torch.zeros(2)}
    with pytest.raises(WeightsError, match=re.escape(key)):
        _convert(state)
    _, report = _convert(state, strict=False)
    assert key in report.unexpected


@pytest.mark.parametrize("key,ours", [
    ("text_encoder.ln_final.weight", "final_layer_norm.weight"),
    ("image_encoder.layers.2.blocks.1.mlp.fc2.bias", "image_encoder.layers.2.blocks.1.mlp.fc2.bias"),
    ("logit_scale", "logit_scale"),
])
def test_strict_conversion_names_a_missing_key(source, key, ours):
    state = {k: v for k, v in source[0].items() if k != key}
    with pytest.raises(WeightsError, match=re.escape(ours)):
        _convert(state)
    _, report = _convert(state, strict=False)
    assert any(k.endswith(ours) for k in report.missing)


def test_arguments_that_cannot_work(source):
    state = source[0]
    with pytest.raises(UniCLConvertError, match="refuses to guess"):
        _convert(state, preprocess={"input_size": [3, SIZE, SIZE]})
    with pytest.raises(UniCLConvertError, match="another image size"):  # the shift masks were built for 64
        _convert(state, preprocess={**PREPROCESS, "input_size": [3, 2 * SIZE, 2 * SIZE]})
    with pytest.raises(UniCLConvertError, match="heads"):
        _convert(state, text_heads=5)
    model, _ = _convert(state, text_heads=None)  # UniCL's default: width // 64
    assert model.config["text"]["num_attention_heads"] == WIDTH // 64
    with pytest.raises(WeightsError, match="patch_embed"):
        _convert({k: v for k, v in state.items() if "patch_embed.proj" not in k})
    assert UNICL_EVAL_PREPROCESS["input_size"] == [3, 224, 224] and UNICL_EVAL_PREPROCESS["crop_pct"] == 0.875


def test_text_tower_pooling_is_stored_and_defaults_by_encoder():
    clip = dict(model_type="clip_text_model", vocab_size=40, hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12, pad_token_id=39,
                eos_token_id=39, bos_token_id=38)
    roberta = dict(model_type="roberta", vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=20, type_vocab_size=1)
    assert TextTower.from_config(clip, embed_dim=8).pooling == "eot"
    assert TextTower.from_config(roberta, embed_dim=8).pooling == "first"
    tower = TextTower.from_config(clip, embed_dim=8, pooling="first").eval()
    assert tower.tower_config["pooling"] == "first"
    assert TextTower.from_config(tower.tower_config, embed_dim=8).pooling == "first"
    with pytest.raises(ValueError, match="pooling"):
        TextTower.from_config(roberta, embed_dim=8, pooling="mean")
    # "eot" reads the state at argmax(input_ids), "first" at position 0
    eot = TextTower.from_config(clip, embed_dim=8).eval()
    eot.load_state_dict(tower.state_dict())
    ids = torch.tensor([[38, 5, 6, 39, 39, 39], [38, 7, 39, 39, 39, 39]])
    with torch.no_grad():
        states = eot.forward_features(ids)
        torch.testing.assert_close(eot(ids), eot.projection(states[[0, 1], [3, 2]]), rtol=0, atol=0)
        torch.testing.assert_close(tower(ids), tower.projection(states[:, 0]), rtol=0, atol=0)


@pytest.mark.slow
def test_swin_tiny_224_release_shape(source):
    """The released image encoder's shape (Swin-T, window 7, 224 px: stage 4 is exactly one window) converts to
    ``swin_tiny`` and matches timm within 1e-5 at UniCL's own evaluation size."""
    gen = torch.Generator().manual_seed(4)
    swin = dict(img_size=224, patch_size=4, num_classes=0, embed_dim=96, depths=(2, 2, 6, 2),
                num_heads=(3, 6, 12, 24), window_size=7)
    timm_model = timm_swin.SwinTransformer(**swin).eval()
    _randomise(timm_model, gen)
    state = {k: v for k, v in source[0].items() if not k.startswith("image_encoder.")}
    state |= {f"image_encoder.{k}": v for k, v in _official_swin_state(timm_model).items()}
    state["image_projection"] = torch.randn(768, DIM, generator=gen) * 0.1
    model, report = _convert(state, preprocess=UNICL_EVAL_PREPROCESS)
    assert model.config["image"]["model"] == "swin_tiny" and not report.resized
    images = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        pooled = timm_model.forward_head(timm_model.forward_features(images), pre_logits=True)
        diff = (model.encode_image(images) - F.normalize(pooled @ state["image_projection"], dim=-1)).abs().max()
    assert diff.item() <= 1e-5, diff.item()


def test_named_clip_text_config_builds_and_round_trips(tmp_path):
    model = create_model("unicl_clip_test", tokenizer=clip_tokenizer()).eval()
    assert type(model.text_encoder.encoder).__name__ == "CLIPTextModel" and model.text_encoder.pooling == "eot"
    batch = model.tokenize(SENTENCES[:2])
    save_pretrained(model, tmp_path / "b")
    loaded = from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(**loaded.tokenize(SENTENCES[:2])), model.encode_text(**batch))

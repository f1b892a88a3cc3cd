"""Foreign image-tower weights: timm and Microsoft Swin layouts, CoSwin from Swin, table resizing, strictness."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import florence  # noqa: E402
from florence.backbone import coswin as cs  # noqa: E402
from florence.backbone.convert import LoadReport, load_image_tower_weights, resize_relative_position_table  # noqa: E402
from timm.models import swin_transformer as timm_swin  # noqa: E402

SMALL = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def reference():
    """A small random timm Swin (same code path as swin_tiny, 32 channels) and an input."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SMALL).eval()
    return model, torch.randn(1, 3, 224, 224)


def _timm_pooled(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def official_swin_state(num_classes: int = 10, resolution: int = 224, window: int = 7, seed: int = 0):
    """A random state dict in the official Swin layout, built from microsoft/Swin-Transformer's model definition
    (``models/swin_transformer.py``), not from timm's names: stage i (dim C_i = C * 2**i) ends with its patch merging
    ``layers.i.downsample`` (``norm`` over 4C_i, ``reduction`` 4C_i -> 2C_i) for i < S-1; every block keeps its
    ``attn.relative_position_index`` buffer and shifted blocks (on maps larger than the window) their ``attn_mask``;
    the classifier is ``head``. Float values are random (LayerNorm affines included), so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(name: str, *shape: int, scale: float = 0.05, offset: float = 0.0) -> None:
        state[name] = torch.randn(*shape, generator=g) * scale + offset

    def layer_norm(prefix: str, dim: int) -> None:
        put(f"{prefix}.weight", dim, scale=0.2, offset=1.0)
        put(f"{prefix}.bias", dim, scale=0.2)

    C, depths, heads = SMALL["embed_dim"], SMALL["depths"], SMALL["num_heads"]
    put("patch_embed.proj.weight", C, 3, 4, 4)
    put("patch_embed.proj.bias", C)
    layer_norm("patch_embed.norm", C)
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        dim, side = C * 2**i, resolution // 4 // 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            layer_norm(f"{p}.norm1", dim)
            put(f"{p}.attn.relative_position_bias_table", (2 * window - 1) ** 2, nh)
            state[f"{p}.attn.relative_position_index"] = torch.arange(window**4).view(window**2, window**2) % 169
            put(f"{p}.attn.qkv.weight", 3 * dim, dim)
            put(f"{p}.attn.qkv.bias", 3 * dim)
            put(f"{p}.attn.proj.weight", dim, dim)
            put(f"{p}.attn.proj.bias", dim)
            layer_norm(f"{p}.norm2", dim)
            put(f"{p}.mlp.fc1.weight", 4 * dim, dim)
            put(f"{p}.mlp.fc1.bias", 4 * dim)
            put(f"{p}.mlp.fc2.weight", dim, 4 * dim)
            put(f"{p}.mlp.fc2.bias", dim)
            if j % 2 == 1 and side > window:
                state[f"{p}.attn_mask"] = torch.zeros((side // window) ** 2, window**2, window**2)
        if i < len(depths) - 1:
            layer_norm(f"layers.{i}.downsample.norm", 4 * dim)
            put(f"layers.{i}.downsample.reduction.weight", 2 * dim, 4 * dim)
    layer_norm("norm", C * 2 ** (len(depths) - 1))
    put("head.weight", num_classes, C * 2 ** (len(depths) - 1))
    put("head.bias", num_classes)
    return state


@pytest.fixture(scope="module")
def official():
    """The official-layout dict and a timm Swin loaded from it through timm's own ``checkpoint_filter_fn``."""
    state = official_swin_state(num_classes=10)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, **SMALL).eval()
    model.load_state_dict(timm_swin.checkpoint_filter_fn(state, model), strict=True)
    return state, model


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_layout_from_file_gives_identical_output(reference, tmp_path, suffix):
    ref, x = reference
    path = tmp_path / f"swin{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    model = cs.swin_tiny(**SMALL).eval()
    report = load_image_tower_weights(model, path, format="timm")
    assert report.missing == [] and report.unexpected == [] and report.newly_initialized == [] and report.resized == []
    assert report.skipped == ["head.fc.bias", "head.fc.weight"]
    assert set(report.loaded) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), _timm_pooled(ref, x), atol=1e-5, rtol=0)


def test_microsoft_layout_equals_timm_checkpoint_filter(official, tmp_path):
    state, reference = official
    path = tmp_path / "swin_ms.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    model = cs.swin_tiny(num_classes=10, **SMALL).eval()
    report = florence.load_weights(model, path, format="microsoft")
    assert report.missing == [] and report.unexpected == [] and report.newly_initialized == []
    assert {"layers.1.downsample.reduction.weight", "head.fc.weight", "head.fc.bias"} <= set(report.loaded)
    assert any(k.endswith("attn_mask") for k in report.skipped)
    assert any(k.endswith("relative_position_index") for k in report.skipped)
    theirs = reference.state_dict()
    assert set(model.state_dict()) == set(theirs)
    for k, v in model.state_dict().items():  # every tensor where timm's own converter puts it
        assert torch.equal(v, theirs[k]), k
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)  # logits through the converted head
        for mine, ref in zip(model.forward_intermediates(x, intermediates_only=True),
                             reference.forward_intermediates(x, intermediates_only=True), strict=True):
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_microsoft_layout_in_timm_format_fails_strictly(official):
    state, _ = official
    with pytest.raises(KeyError, match="layers.0.downsample"):
        load_image_tower_weights(cs.swin_tiny(**SMALL), state, format="timm")


def test_classifier_head_loads_only_when_the_class_count_matches(reference):
    ref, x = reference  # timm's default 1000-way head
    fits = cs.swin_tiny(num_classes=1000, **SMALL).eval()
    report = load_image_tower_weights(fits, ref.state_dict(), format="timm")
    assert {"head.fc.weight", "head.fc.bias"} <= set(report.loaded) and report.skipped == []
    with torch.no_grad():
        torch.testing.assert_close(fits(x), ref(x), atol=1e-5, rtol=0)
    other = cs.swin_tiny(num_classes=7, **SMALL)
    fresh = other.head.fc.weight.clone()
    report = load_image_tower_weights(other, ref.state_dict(), format="timm")  # strict: passes
    assert report.skipped == ["head.fc.bias", "head.fc.weight"] and report.unexpected == []
    assert report.newly_initialized == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(other.head.fc.weight, fresh)
    headless = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    report = load_image_tower_weights(cs.swin_tiny(num_classes=7, **SMALL), headless, format="timm")
    assert report.newly_initialized == ["head.fc.bias", "head.fc.weight"] and report.missing == []
    assert "newly_initialized: head.fc (bias, weight)" in str(report)


def test_coswin_from_swin_checkpoint_reports_new_embeddings(official):
    state, reference = official
    model = cs.coswin_tiny(**SMALL).eval()
    unicl_like = {f"image_encoder.{k}": v for k, v in state.items()}
    unicl_like.update({"text_encoder.embeddings.weight": torch.zeros(3, 4), "logit_scale": torch.zeros(())})
    report = load_image_tower_weights(model, unicl_like, format="microsoft")  # strict: passes
    embeds = [k for k in model.state_dict() if k.startswith("patch_embed.") or ".downsample." in k]
    assert report.newly_initialized == sorted(embeds)
    assert len(embeds) == 4 * 4  # stem + 3 conv embeddings, each conv weight/bias + norm weight/bias
    # skipped names are in timm's layout (after the Microsoft mapping): stage 0's merging is layers.1.downsample
    assert {"patch_embed.proj.weight", "layers.1.downsample.reduction.weight"} <= set(report.skipped)
    assert {"logit_scale", "text_encoder.embeddings.weight", "head.fc.weight"} <= set(report.skipped)
    assert report.missing == [] and report.unexpected == []
    source = reference.state_dict()
    for k in report.loaded:  # every block / final-norm tensor came from the checkpoint
        assert torch.equal(model.state_dict()[k], source[k]), k
    assert len(report.loaded) == len(model.state_dict()) - len(embeds)
    text = str(report)
    assert "newly_initialized: layers.1.downsample.norm (bias, weight)" in text
    assert "patch_embed.proj (bias, weight)" in text


def test_window_7_to_12_resizes_bias_tables(reference):
    ref, _ = reference
    model = cs.swin_tiny(window_size=12, img_size=384, **SMALL).eval()
    report = load_image_tower_weights(model, ref.state_dict(), format="timm")
    tables = sorted(k for k in model.state_dict() if k.endswith("relative_position_bias_table"))
    assert report.resized == tables and len(tables) == 5
    for k in tables:
        src = ref.state_dict()[k]  # (13*13, nH)
        heads = src.shape[1]
        expected = F.interpolate(src.t().reshape(1, heads, 13, 13), size=(23, 23), mode="bicubic", align_corners=False)
        assert model.state_dict()[k].shape == (23 * 23, heads)
        torch.testing.assert_close(model.state_dict()[k], expected.reshape(heads, -1).t())
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 384, 384))).all()


def test_resize_keeps_constant_tables_and_identity():
    table = torch.full((169, 3), 0.25)
    torch.testing.assert_close(resize_relative_position_table(table, (12, 12)), torch.full((529, 3), 0.25))
    same = torch.randn(169, 2)
    assert resize_relative_position_table(same, (7, 7)) is same
    with pytest.raises(ValueError, match="not square"):
        resize_relative_position_table(torch.zeros(170, 2), (7, 7))


def test_strict_errors_name_keys_and_non_strict_reports(reference):
    ref, _ = reference
    state = dict(ref.state_dict())
    del state["layers.2.blocks.1.mlp.fc2.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["norm.weight"] = torch.zeros(5)
    with pytest.raises(KeyError) as err:
        load_image_tower_weights(cs.swin_tiny(**SMALL), state, format="timm")
    message = str(err.value)
    assert "layers.2.blocks.1.mlp.fc2.weight" in message and "extra.weight" in message and "norm.weight" in message
    report = load_image_tower_weights(cs.swin_tiny(**SMALL), state, format="timm", strict=False)
    assert report.missing == ["layers.2.blocks.1.mlp.fc2.weight"]
    assert report.unexpected == ["extra.weight", "norm.weight"]
    assert isinstance(report, LoadReport) and "missing 1" in str(report)


def test_florence_format_round_trip():
    torch.manual_seed(0)
    source = florence.create_model("coswin_test").eval()
    target = florence.create_model("coswin_test").eval()
    report = load_image_tower_weights(target, source.state_dict(), format="florence")
    assert report.newly_initialized == [] and set(report.loaded) == set(target.state_dict())
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))


class _Payload:  # an arbitrary object a malicious checkpoint could carry
    pass


def test_refuses_to_unpickle_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "obj": _Payload()}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        load_image_tower_weights(florence.create_model("coswin_test"), path)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_image_tower_weights(florence.create_model("coswin_test"), tmp_path / "absent.safetensors")

"""Foreign image-tower weights: timm and Microsoft Swin layouts, CoSwin from Swin, table resizing, strictness."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import florence  # noqa: E402
from florence.backbone import coswin as cs  # noqa: E402
from florence.backbone.convert import LoadReport, load_image_tower_weights, resize_relative_position_table  # noqa: E402

SMALL = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def reference():
    """A small random timm Swin (same code path as swin_tiny, 32 channels) and an input."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SMALL).eval()
    return model, torch.randn(1, 3, 224, 224)


def _timm_pooled(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def timm_to_microsoft(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The official Swin layout: downsample at the end of a stage, plain ``head``, persistent index/mask buffers."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k.replace("head.fc.", "head.")] = v
    for k, v in model.named_buffers():  # relative_position_index and attn_mask are saved in Microsoft checkpoints
        out[k] = v
    assert "layers.0.downsample.reduction.weight" in out and any(k.endswith("attn_mask") for k in out)
    return out


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


def test_microsoft_layout_gives_identical_output(reference, tmp_path):
    ref, x = reference
    path = tmp_path / "swin_ms.pth"
    torch.save({"model": {f"module.{k}": v for k, v in timm_to_microsoft(ref).items()}}, path)
    model = cs.swin_tiny(**SMALL).eval()
    report = florence.load_weights(model, path, format="microsoft")
    assert report.missing == [] and report.unexpected == []
    assert "layers.1.downsample.reduction.weight" in report.loaded
    assert any(k.endswith("attn_mask") for k in report.skipped)
    assert any(k.endswith("relative_position_index") for k in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _timm_pooled(ref, x), atol=1e-5, rtol=0)
        for mine, theirs in zip(model.forward_intermediates(x), ref.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_microsoft_layout_in_timm_format_fails_strictly(reference):
    ref, _ = reference
    with pytest.raises(KeyError, match="layers.0.downsample"):
        load_image_tower_weights(cs.swin_tiny(**SMALL), timm_to_microsoft(ref), format="timm")


def test_coswin_from_swin_checkpoint_reports_new_embeddings(reference):
    ref, x = reference
    model = cs.coswin_tiny(**SMALL).eval()
    unicl_like = {f"image_encoder.{k}": v for k, v in timm_to_microsoft(ref).items()}
    unicl_like.update({"text_encoder.embeddings.weight": torch.zeros(3, 4), "logit_scale": torch.zeros(())})
    report = load_image_tower_weights(model, unicl_like, format="microsoft")  # strict: passes
    embeds = [k for k in model.state_dict() if k.startswith("patch_embed.") or ".downsample." in k]
    assert report.newly_initialized == sorted(embeds)
    assert len(embeds) == 4 * 4  # stem + 3 conv embeddings, each conv weight/bias + norm weight/bias
    # skipped names are in timm's layout (after the Microsoft mapping): stage 0's merging is layers.1.downsample
    assert {"patch_embed.proj.weight", "layers.1.downsample.reduction.weight"} <= set(report.skipped)
    assert {"logit_scale", "text_encoder.embeddings.weight"} <= set(report.skipped)
    assert report.missing == [] and report.unexpected == []
    source = ref.state_dict()
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

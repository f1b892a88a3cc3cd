"""CoSwin / Swin image tower: parity with timm, geometry helpers, padding, attention paths, checkpointing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import florence  # noqa: E402
from florence.backbone import coswin as cs  # noqa: E402
from florence.backbone.coswin import (  # noqa: E402
    CoSwin,
    relative_position_index,
    shift_attention_mask,
    window_order,
    window_partition,
    window_reverse,
)
from timm.models import swin_transformer as timm_swin  # noqa: E402

TIMM_NAMES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "swin_large": "swin_large_patch4_window7_224",
}


def _timm_weights(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}


def _assert_timm_parity(reference: torch.nn.Module, ours: CoSwin, x: torch.Tensor) -> None:
    """forward_features (NHWC), forward_head with and without the classifier, forward, forward_intermediates
    (the other forward_intermediates options are checked on a small model in test_backbone_contract.py)."""
    ours.load_state_dict(_timm_weights(reference), strict=True)
    classifier = copy.deepcopy(ours)
    classifier.reset_classifier(reference.num_classes)
    classifier.load_state_dict(reference.state_dict(), strict=True)  # head.fc: timm's names, no mapping
    with torch.no_grad():
        features = reference.forward_features(x)  # B, H/32, W/32, 8C
        pooled = reference.forward_head(features, pre_logits=True)
        logits = reference.forward_head(features)  # timm's forward(x)
        final, maps = reference.forward_intermediates(x)
        for fused in (True, False):
            ours.fused_attn = classifier.fused_attn = fused
            mine = ours.forward_features(x)
            assert mine.shape == features.shape == (x.shape[0], x.shape[2] // 32, x.shape[3] // 32, 768)
            torch.testing.assert_close(mine, features, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours.forward_head(mine, pre_logits=True), pooled, atol=1e-5, rtol=0)
            torch.testing.assert_close(classifier.forward_head(mine), logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(classifier.forward_head(mine, pre_logits=True), pooled, atol=1e-5, rtol=0)
            my_final, my_maps = ours.forward_intermediates(x)
            torch.testing.assert_close(my_final, final, atol=1e-5, rtol=0)
            for mine_i, theirs in zip(my_maps, maps, strict=True):
                assert mine_i.shape == theirs.shape
                torch.testing.assert_close(mine_i, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), pooled, atol=1e-5, rtol=0)  # no classifier: the pooled feature
        torch.testing.assert_close(classifier(x), logits, atol=1e-5, rtol=0)


def test_swin_tiny_matches_timm_224():
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    _assert_timm_parity(reference, cs.swin_tiny().eval(), torch.randn(1, 3, 224, 224))


@pytest.mark.slow
def test_swin_tiny_window12_matches_timm_384():
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, window_size=12, img_size=384)
    ours = cs.swin_tiny(window_size=12, img_size=384).eval()
    assert ours.default_preprocess["input_size"] == [3, 384, 384]
    _assert_timm_parity(reference.eval(), ours, torch.randn(1, 3, 384, 384))


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_swin_parameter_names_and_counts_equal_timm_without_classifier(name):
    with torch.device("meta"):
        ours = getattr(cs, name)()
        reference = timm.create_model(TIMM_NAMES[name], pretrained=False)
    theirs = {k: tuple(p.shape) for k, p in reference.named_parameters() if not k.startswith("head.")}
    assert {k: tuple(p.shape) for k, p in ours.named_parameters()} == theirs
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for k, p in reference.named_parameters()
                                                          if not k.startswith("head."))


def test_swin_classifier_names_equal_timm_and_leave_backbone_init_unchanged():
    with torch.device("meta"):
        ours = cs.swin_tiny(num_classes=1000)
        reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    assert {k: tuple(p.shape) for k, p in ours.named_parameters()} == {
        k: tuple(p.shape) for k, p in reference.named_parameters()}
    assert ours.get_classifier() is ours.head.fc
    torch.manual_seed(0)
    plain = florence.create_model("coswin_test")
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    with_head = florence.create_model("coswin_test", num_classes=5)
    assert list(plain.head.parameters()) == [] and isinstance(plain.get_classifier(), torch.nn.Identity)
    for name, value in plain.state_dict().items():  # the classifier is drawn after the backbone
        assert torch.equal(with_head.state_dict()[name], value), name
    torch.manual_seed(0)
    florence.create_model("coswin_test")
    assert torch.equal(torch.rand(3), after_plain)  # a headless tower draws nothing beyond its own parameters


@pytest.mark.parametrize(
    "name, millions", [("coswin_tiny", 29.5), ("coswin_base", 90.2), ("coswin_large", 202.8), ("coswin_huge", 680.9)]
)
def test_coswin_parameter_counts_match_spec(name, millions):
    with torch.device("meta"):
        model = florence.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_coswin_conv_embeddings():
    with torch.device("meta"):
        model = cs.coswin_tiny()
    stem = model.patch_embed.proj
    conv_shape = lambda c: (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)  # noqa: E731
    assert conv_shape(stem) == (3, 96, (7, 7), (4, 4), (2, 2))
    for i in (1, 2, 3):
        conv = model.layers[i].downsample.proj
        c = 96 * 2 ** (i - 1)
        assert conv_shape(conv) == (c, 2 * c, (3, 3), (2, 2), (1, 1))
        assert model.layers[i].downsample.norm.normalized_shape == (2 * c,)
    assert model.feature_info == [dict(num_chs=96 * 2**i, reduction=4 * 2**i, module=f"layers.{i}") for i in range(4)]
    assert model.num_features == 768


@pytest.mark.parametrize(
    "size, expected",
    [
        ((224, 224), [(56, 56), (28, 28), (14, 14), (7, 7)]),
        ((384, 384), [(96, 96), (48, 48), (24, 24), (12, 12)]),
        ((200, 300), [(50, 75), (25, 38), (13, 19), (7, 10)]),
    ],
)
def test_coswin_stage_shapes_any_size(size, expected):
    torch.manual_seed(0)
    model = florence.create_model("coswin_test").eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        pooled = model(x)
        single = model(x[1:])
    assert [tuple(m.shape[2:]) for m in maps] == expected
    assert [m.shape[1] for m in maps] == [32, 64, 128, 256]
    assert pooled.shape == (2, 256) and torch.isfinite(pooled).all()
    torch.testing.assert_close(single, pooled[1:], atol=1e-5, rtol=0)  # samples stay independent (no padding leak)


def test_swin_patch_embed_pads_odd_input():
    torch.manual_seed(0)
    model = cs.swin_tiny(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 202, 301), intermediates_only=True)
    assert [tuple(m.shape[2:]) for m in maps] == [(51, 76), (26, 38), (13, 19), (7, 10)]


@pytest.mark.slow
def test_detection_size_800x1216():
    model = florence.create_model("coswin_test").eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 800, 1216), intermediates_only=True)
    assert [tuple(m.shape[2:]) for m in maps] == [(200, 304), (100, 152), (50, 76), (25, 38)]


@pytest.mark.parametrize("size", [(224, 224), (200, 300)])
def test_fused_attention_equals_eager(size):
    torch.manual_seed(0)
    model = florence.create_model("coswin_test", window_size=5).eval()  # 5 does not divide 56: padding + shift
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        model.set_fused_attn(True)
        fused = model.forward_intermediates(x, intermediates_only=True) + [model(x)]
        model.fused_attn = False
        assert not any(m.fused_attn for m in model.modules() if isinstance(m, cs.WindowAttention))
        eager = model.forward_intermediates(x, intermediates_only=True) + [model(x)]
    for a, b in zip(fused, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bf16_autocast_runs_fused_and_eager():
    model = florence.create_model("coswin_test").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        for fused in (True, False):
            model.fused_attn = fused
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)


def test_grad_checkpointing_same_output_and_gradients():
    torch.manual_seed(0)
    model = florence.create_model("coswin_test").train()  # no dropout / drop path: deterministic in train mode
    x = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out**2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_out, plain_grads = run()
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = run()
    names = {n for n, _ in model.named_parameters()}
    assert set(plain_grads) == names and set(ckpt_grads) == names  # every parameter gets a gradient
    torch.testing.assert_close(ckpt_out, plain_out, atol=1e-6, rtol=0)
    for n in names:
        torch.testing.assert_close(ckpt_grads[n], plain_grads[n], atol=1e-6, rtol=1e-5)


def test_window_partition_round_trip_and_order():
    x = torch.randn(2, 14, 21, 5)
    windows = window_partition(x, (7, 7))
    assert windows.shape == (2 * 2 * 3, 49, 5)
    assert torch.equal(window_reverse(windows, (7, 7), 14, 21), x)
    assert torch.equal(windows.view(-1, 7, 7, 5), timm_swin.window_partition(x, (7, 7)))
    assert torch.equal(window_reverse(window_partition(x, (2, 3)), (2, 3), 14, 21), x)


def test_window_order_is_roll_then_partition_and_inverse_undoes_it():
    x = torch.randn(2, 14, 21, 5)
    tokens = x.reshape(2, -1, 5)
    order = window_order((14, 21), (7, 7), (3, 3))
    expected = window_partition(torch.roll(x, (-3, -3), (1, 2)), (7, 7)).reshape(2, -1, 5)
    assert torch.equal(tokens[:, order], expected)
    assert torch.equal(expected[:, torch.argsort(order)], tokens)
    plain = window_partition(torch.arange(14 * 21).view(1, 14, 21, 1), (7, 7)).flatten()
    assert torch.equal(window_order((14, 21), (7, 7), (0, 0)), plain)


def test_window_order_after_shift_is_roll_then_pad_then_partition():
    x = torch.randn(2, 13, 19, 5)  # window 7: padded to 14 x 21
    order = window_order((14, 21), (7, 7), (3, 3), roll_size=(13, 19))
    padded = F.pad(x, (0, 0, 0, 2, 0, 1)).reshape(2, -1, 5)
    expected = window_partition(F.pad(torch.roll(x, (-3, -3), (1, 2)), (0, 0, 0, 2, 0, 1)), (7, 7)).reshape(2, -1, 5)
    assert torch.equal(padded[:, order], expected)
    assert torch.equal(torch.sort(order).values, torch.arange(14 * 21))  # a permutation: the inverse gather exists
    before = window_order((14, 21), (7, 7), (3, 3))
    assert not torch.equal(order, before)


@pytest.mark.parametrize("padded, window", [((14, 21), (7, 7)), ((4, 21), (4, 7)), ((14, 14), (14, 14)),
                                            ((7, 7), (7, 7)), ((3, 8), (1, 4)), ((2, 6), (2, 3)), ((4, 3), (2, 1))])
def test_identity_partition_is_told_from_sizes(padded, window):
    order = window_order(padded, window, (0, 0))
    is_identity = torch.equal(order, torch.arange(order.numel()))
    assert (cs._token_order(padded, window, (0, 0), None).order is None) == is_identity


def test_geometry_cache_key_includes_window_pad():
    stage = florence.create_model("coswin_test").layers[0]
    before = stage.geometry(13, 19, torch.device("cpu"))
    stage.window_pad = "after_shift"
    after = stage.geometry(13, 19, torch.device("cpu"))
    assert after is not before and not torch.equal(after.shifted.order, before.shifted.order)
    torch.testing.assert_close(after.shift_mask, before.shift_mask)  # both label the padded map the same way
    stage.window_pad = "before_shift"
    assert stage.geometry(13, 19, torch.device("cpu")) is before
    with pytest.raises(ValueError, match="window_pad"):
        CoSwin(window_pad="pad_first")


def _reference_block(block: cs.SwinBlock, x: torch.Tensor, geo: cs.WindowGeometry) -> torch.Tensor:
    """Swin-Det order with explicit ops: pad, roll, partition, masked attention, reverse, roll back, crop."""
    B, H, W, C = x.shape
    Hp, Wp = geo.padded
    shift = geo.shift if block.shifted else (0, 0)
    y = F.pad(block.norm1(x), (0, 0, 0, Wp - W, 0, Hp - H))
    y = torch.roll(y, (-shift[0], -shift[1]), (1, 2))
    y = block.attn(window_partition(y, geo.window), geo.rel_index, geo.shift_mask if any(shift) else None)
    y = torch.roll(window_reverse(y, geo.window, Hp, Wp), shift, (1, 2))[:, :H, :W]
    x = x + y
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("size", [(13, 19), (4, 20), (14, 14), (7, 7)])
def test_block_gather_path_equals_explicit_pad_roll_partition(size):
    torch.manual_seed(0)
    stage = florence.create_model("coswin_test", window_size=5).layers[2].eval()  # 4 heads, one regular + one shifted
    x = torch.randn(2, *size, 128)
    geo = stage.geometry(*size, x.device)
    with torch.no_grad():
        for block in stage.blocks:
            for fused in (True, False):
                block.attn.fused_attn = fused
                torch.testing.assert_close(block(x, geo), _reference_block(block, x, geo), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [(7, 7), (12, 12), (3, 5)])
def test_relative_position_index_equals_swin_construction(window):
    assert torch.equal(relative_position_index(window), timm_swin.get_relative_position_index(*window))


def test_clamped_window_reads_the_same_offsets_of_the_table():
    index = relative_position_index((3, 4), table_window=(7, 7))
    coords = [(i, j) for i in range(3) for j in range(4)]
    for q, (qi, qj) in enumerate(coords):
        for k, (ki, kj) in enumerate(coords):
            assert divmod(int(index[q, k]), 13) == (qi - ki + 6, qj - kj + 6)
    with pytest.raises(ValueError, match="larger"):
        relative_position_index((8, 8), table_window=(7, 7))


def test_shift_mask_equals_swin_and_uses_minus_100():
    block = timm_swin.SwinTransformerBlock(dim=8, input_resolution=(28, 28), num_heads=1, window_size=7, shift_size=3)
    ours = shift_attention_mask((28, 28), (7, 7), (3, 3))
    assert torch.equal(ours, block.attn_mask)
    assert set(ours.unique().tolist()) == {-100.0, 0.0}


def test_stage_geometry_clamps_window_and_zero_shift_when_map_fits():
    stage = florence.create_model("coswin_test").layers[0]
    fits = stage.geometry(7, 7, torch.device("cpu"))
    assert fits.window == (7, 7) and fits.shift == (0, 0) and fits.shift_mask is None
    small = stage.geometry(4, 20, torch.device("cpu"))
    assert small.window == (4, 7) and small.shift == (0, 3) and small.padded == (4, 21)
    assert small.shift_mask.shape == (3, 28, 28)
    big = stage.geometry(56, 56, torch.device("cpu"))
    assert big.shift == (3, 3) and big.shift_mask.shape == (64, 49, 49)
    assert stage.geometry(56, 56, torch.device("cpu")) is big  # cached, not rebuilt


def test_backbone_contract():
    model = florence.create_model("coswin_test", drop_path_rate=0.3)
    nwd = model.no_weight_decay()
    assert nwd and all(n.endswith("relative_position_bias_table") for n in nwd)
    assert len(nwd) == sum(1 for n, _ in model.named_parameters() if "relative_position_bias_table" in n) == 5
    assert model.default_preprocess == dict(
        input_size=[3, 56, 56], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation="bicubic",
        crop_pct=0.875,
    )
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for stage in model.layers for b in stage.blocks]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])
    assert isinstance(model.layers[1].blocks[0].drop_path1, timm.layers.DropPath)
    assert isinstance(model.layers[0].blocks[0].drop_path1, torch.nn.Identity)  # rate 0, as timm's block
    assert all(isinstance(m, torch.nn.Identity) for m in cs.coswin_tiny().modules() if "drop_path" in type(m).__name__
               .lower())
    for preset in (cs._TINY, cs._SMALL, cs._BASE, cs._LARGE, cs._HUGE):  # drop_path_rate is a training setting
        assert "drop_path_rate" not in preset
    with torch.device("meta"):
        tiny = cs.coswin_tiny()
        tiny_dp = florence.create_model("coswin_tiny", drop_path_rate=0.2)
    assert not any(isinstance(m, timm.layers.DropPath) for m in tiny.modules())
    assert [getattr(b.drop_path1, "drop_prob", 0.0) for st in tiny_dp.layers for b in st.blocks] == pytest.approx(
        [0.2 * i / 11 for i in range(12)])
    assert set(florence.list_models("*swin*")) >= {
        "coswin_test", "coswin_tiny", "coswin_small", "coswin_base", "coswin_large", "coswin_huge",
        "swin_tiny", "swin_small", "swin_base", "swin_large",
    }
    with pytest.raises(ValueError, match="embed"):
        CoSwin(embed="linear")

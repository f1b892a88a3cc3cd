"""CoSwin's timm backbone contract on small models: classifier head, forward_intermediates options and pruning against
timm, group_matcher / layer-wise decay, output norms, tokens, the two window_pad orders against their references
(timm; a Swin-Det forward written here), and torch.compile(fullgraph=True)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import florence  # noqa: E402
from florence.backbone import coswin as cs  # noqa: E402
from timm.models import group_parameters  # noqa: E402
from timm.optim import param_groups_layer_decay  # noqa: E402

# the swin_tiny code path with 16 channels and two blocks per stage (so every stage has a shifted block)
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
TIMM_TINY = "swin_tiny_patch4_window7_224"


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def pair():
    """A small random timm Swin with a 10-way classifier, our swin_tiny with its weights, and a 224 input."""
    torch.manual_seed(0)
    reference = timm.create_model(TIMM_TINY, pretrained=False, num_classes=10, **SMALL).eval()
    ours = cs.swin_tiny(num_classes=10, **SMALL).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours, torch.randn(1, 3, 224, 224)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# -- classifier head ---------------------------------------------------------------------------------------------


def test_forward_head_and_classifier_equal_timm(pair):
    reference, ours, x = pair
    with torch.no_grad():
        features = ours.forward_features(x)
        _close(features, reference.forward_features(x))  # NHWC (1, 7, 7, 128)
        _close(ours.forward_head(features), reference.forward_head(features))
        _close(ours.forward_head(features, pre_logits=True), reference.forward_head(features, pre_logits=True))
        _close(ours(x), reference(x))
    assert ours(x).shape == (1, 10) and ours.get_classifier().weight.shape == (10, 128)


def test_reset_classifier_global_pool_and_head_dropout():
    torch.manual_seed(0)
    model = florence.create_model("coswin_test").eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        pooled = model(x)
        assert pooled.shape == (2, 256) and model.num_classes == 0
        model.reset_classifier(7)
        assert model.num_classes == 7 and isinstance(model.get_classifier(), torch.nn.Linear)
        assert model(x).shape == (2, 7)
        _close(model.forward_head(model.forward_features(x), pre_logits=True), pooled)
        _close(model(x), model.get_classifier()(pooled))
        model.reset_classifier(0, global_pool="")  # timm: no pooling, forward_head passes the map through
        _close(model(x), model.forward_features(x))
    # a tower made by create_model records its head, so a bundle rebuilds it
    assert model.florence_config["overrides"] == {"num_classes": 0, "global_pool": ""}
    model.reset_classifier(3, global_pool="avg")
    rebuilt = cs.coswin_test(**model.florence_config["overrides"])
    assert rebuilt.get_classifier().weight.shape == (3, 256) and rebuilt.global_pool == "avg"
    # drop_rate is timm's head dropout: on the pooled feature, in training only
    dropped = cs.coswin_test(drop_rate=0.5).train()
    assert dropped.head.drop.p == 0.5
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in dropped.layers.modules())
    torch.manual_seed(1)
    train_out = dropped(x)
    assert (train_out == 0).float().mean() > 0.3  # about half of the pooled features dropped
    with torch.no_grad():
        assert (dropped.eval()(x) != 0).all()


# -- forward_intermediates / prune_intermediate_layers -------------------------------------------------------------


@pytest.mark.parametrize("indices, stop_early", [(None, False), (1, False), (2, True), ([0, 2], True),
                                                 ([-1, -3], False), ((1,), True)])
def test_forward_intermediates_options_equal_timm(pair, indices, stop_early):
    reference, ours, x = pair
    with torch.no_grad():
        final, maps = reference.forward_intermediates(x, indices=indices, norm=True, stop_early=stop_early)
        mine_final, mine = ours.forward_intermediates(x, indices=indices, norm=True, stop_early=stop_early)
        only = ours.forward_intermediates(x, indices=indices, norm=True, stop_early=stop_early,
                                          output_fmt="NHWC", intermediates_only=True)
    _close(mine_final, final)  # the last stage run, normed only when it is the last stage
    assert len(mine) == len(maps) == len(only)
    for a, b, c in zip(mine, maps, only):
        _close(a, b)  # NCHW
        _close(c, b.permute(0, 2, 3, 1))  # NHWC


def test_forward_intermediates_rejects_bad_arguments(pair):
    _, ours, x = pair
    with pytest.raises(ValueError, match="output_fmt"):
        ours.forward_intermediates(x, output_fmt="NLC")
    with pytest.raises(AssertionError, match="out of range"):  # timm's feature_take_indices
        ours.forward_intermediates(x, indices=[4])


@pytest.mark.parametrize("indices, prune_norm, prune_head", [([0, 1], False, True), (1, True, False),
                                                             ([-1], False, True), (4, False, False)])
def test_prune_intermediate_layers_equals_timm(pair, indices, prune_norm, prune_head):
    reference, ours, x = copy.deepcopy(pair[0]), copy.deepcopy(pair[1]), pair[2]
    kept = ours.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
    assert kept == reference.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
    assert len(ours.layers) == len(reference.layers) and ours.num_features == reference.num_features
    assert set(ours.state_dict()) == set(reference.state_dict())
    with torch.no_grad():
        _close(ours(x), reference(x))  # pooled / logits, or the map itself once the head is pruned
        for a, b in zip(ours.forward_intermediates(x, indices=kept, intermediates_only=True),
                        reference.forward_intermediates(x, indices=kept, intermediates_only=True), strict=True):
            _close(a, b)


# -- group_matcher / layer-wise decay ------------------------------------------------------------------------------


def _layer_ids(model: torch.nn.Module, coarse: bool = False) -> dict[str, int]:
    return group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)


def _decay_groups(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=0.75)
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_group_matcher_gives_timm_layer_ids_for_swin_and_coswin():
    with torch.device("meta"):
        reference = timm.create_model(TIMM_TINY, pretrained=False)
        swin = cs.swin_tiny(num_classes=1000)
        coswin = cs.coswin_tiny(num_classes=1000)
    for coarse in (False, True):
        assert swin.group_matcher(coarse) == reference.group_matcher(coarse)
        assert _layer_ids(swin, coarse) == _layer_ids(reference, coarse)
    assert _decay_groups(swin) == _decay_groups(reference)  # timm's optimiser helper runs on our model
    theirs = _layer_ids(reference)
    assert max(theirs.values()) == 13  # stem, 12 blocks (downsampling with a stage's first block), final norm+head

    def timm_name(name: str) -> str:  # the timm parameter of the same module role
        if name.startswith("patch_embed."):
            return "patch_embed.proj.weight"  # CoSwin's conv stem is the stem
        if ".downsample." in name:
            return name.split(".downsample.")[0] + ".downsample.reduction.weight"  # conv embedding = patch merging
        return name

    ids = _layer_ids(coswin)
    assert set(ids) == {n for n, _ in coswin.named_parameters()}
    for name, layer in ids.items():
        assert layer == theirs[timm_name(name)], name
    decay = _decay_groups(coswin)
    assert decay["patch_embed.proj.weight"] == (0.75**13, 0.05) and decay["head.fc.weight"] == (1.0, 0.05)
    assert decay["layers.1.downsample.proj.weight"] == decay["layers.1.blocks.0.attn.qkv.weight"]


# -- output norms, tokens ---------------------------------------------------------------------------------------------


def test_out_norms_off_by_default_and_normalise_every_level():
    torch.manual_seed(0)
    plain = cs.coswin_test().eval()
    assert not any(n.startswith(("norm0", "norm1", "norm2", "norm3")) for n in plain.state_dict())
    model = cs.coswin_test(out_norms=True).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    for i, width in enumerate((32, 64, 128, 256)):
        norm = getattr(model, f"norm{i}")  # Swin-Det's names: backbone.norm{i} loads with no mapping
        assert norm.normalized_shape == (width,)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        raw = plain.forward_intermediates(x, intermediates_only=True)
        final, maps = model.forward_intermediates(x, norm=True)  # the level norms take the place of norm=True
        for i, (a, b) in enumerate(zip(maps, raw, strict=True)):
            norm = getattr(model, f"norm{i}")
            expected = F.layer_norm(b.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias)
            _close(a, expected.permute(0, 3, 1, 2))
        _close(final, plain.forward_features(x))  # forward_features / forward keep the final norm only
        _close(model(x), plain(x))
        assert [m.shape[1] for m in model.forward_intermediates(x, indices=2, intermediates_only=True)] == [128, 256]
    model.prune_intermediate_layers([0, 1])
    assert not hasattr(model, "norm2") and hasattr(model, "norm1")


def test_forward_tokens_are_the_final_map_row_major(pair):
    reference, ours, x = pair
    with torch.no_grad():
        tokens, size = ours.forward_tokens(x)
        assert tokens.shape == (1, 49, 128) and size == (7, 7)
        _close(tokens, reference.forward_features(x).flatten(1, 2))
        tokens, size = florence.create_model("coswin_test").forward_tokens(torch.randn(1, 3, 200, 300))
    assert tokens.shape == (1, 70, 256) and size == (7, 10)


# -- window_pad: timm's order and Swin-Det's order ------------------------------------------------------------------


def test_after_shift_equals_timm_at_224x320():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 320)  # maps 56x80, 28x40, 14x20, 7x10: no width a multiple of the window 7
    # timm fixes each block's window and shift when built, so it is built at the input size; strict_img_size=False
    # builds its shift masks from the padded map at run time (dynamic_mask)
    reference = timm.create_model(TIMM_TINY, pretrained=False, img_size=(224, 320), strict_img_size=False, **SMALL)
    reference.eval()
    ours = cs.swin_tiny(window_pad="after_shift", **SMALL).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("head.")})
    with torch.no_grad():
        final, maps = reference.forward_intermediates(x)
        for fused in (True, False):
            ours.fused_attn = fused
            mine_final, mine = ours.forward_intermediates(x)
            _close(mine_final, final)
            for a, b in zip(mine, maps, strict=True):
                _close(a, b)


def _swin_det_block(block: torch.nn.Module, x: torch.Tensor, w: int, shift: int) -> torch.Tensor:
    """One Swin-Det (mmdet) block on ``(B, H, W, C)`` with plain ops: norm1, zero-pad to window multiples, roll the
    padded map, attend window by window (mask labels from the padded map), roll back, crop, residual, MLP."""
    B, H, W, C = x.shape
    heads, attn = block.attn.num_heads, block.attn
    d = C // heads
    y = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias)
    Hp, Wp = -(-H // w) * w, -(-W // w) * w
    y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))
    labels = torch.zeros(Hp, Wp)
    if shift:
        y = torch.roll(y, (-shift, -shift), (1, 2))
        count = 0
        for rows in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            for cols in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
                labels[rows, cols] = count
                count += 1
    cells = [(r, c) for r in range(w) for c in range(w)]
    index = torch.tensor([[(r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1) for r2, c2 in cells]
                          for r1, c1 in cells])  # w*w, w*w
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # heads, w*w, w*w
    out = torch.zeros_like(y)
    for r in range(0, Hp, w):
        for c in range(0, Wp, w):
            tokens = y[:, r:r + w, c:c + w].reshape(B, w * w, C)
            qkv = F.linear(tokens, attn.qkv.weight, attn.qkv.bias).view(B, w * w, 3, heads, d)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # B, heads, w*w, d
            logits = (q * d**-0.5) @ k.transpose(-2, -1) + bias
            if shift:
                window_labels = labels[r:r + w, c:c + w].reshape(-1)
                logits = logits + torch.where(window_labels[:, None] == window_labels[None, :], 0.0, -100.0)
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, w * w, C)
            out[:, r:r + w, c:c + w] = F.linear(o, attn.proj.weight, attn.proj.bias).view(B, w, w, C)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out[:, :H, :W]
    z = F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias)
    z = F.gelu(F.linear(z, block.mlp.fc1.weight, block.mlp.fc1.bias))
    z = F.linear(z, block.mlp.fc2.weight, block.mlp.fc2.bias)
    return x + z


def _swin_det_forward(model: cs.CoSwin, x: torch.Tensor, w: int = 7) -> list[torch.Tensor]:
    """Swin-Det's backbone outputs ``norm{i}(stage i)`` (NCHW), from Swin-Transformer-Object-Detection's
    ``mmdet/models/backbones/swin_transformer.py``: patch embed (conv 4/4 + LN), per stage its blocks (the window is
    never clamped; odd blocks shift by w // 2), the output norm, then patch merging at the stage's end (pad to even;
    x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]; LN; Linear)."""
    embed = model.patch_embed
    y = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=4).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (y.shape[-1],), embed.norm.weight, embed.norm.bias)
    outs = []
    for i, stage in enumerate(model.layers):
        if i > 0:  # the previous stage's patch merging
            merge = stage.downsample
            _, H, W, C = y.shape
            y = F.pad(y, (0, 0, 0, W % 2, 0, H % 2))
            y = torch.cat([y[:, 0::2, 0::2], y[:, 1::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 1::2]], -1)
            y = F.linear(F.layer_norm(y, (4 * C,), merge.norm.weight, merge.norm.bias), merge.reduction.weight)
        for j, block in enumerate(stage.blocks):
            y = _swin_det_block(block, y, w, w // 2 if j % 2 else 0)
        norm = getattr(model, f"norm{i}")
        outs.append(F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias).permute(0, 3, 1, 2))
    return outs


def test_before_shift_equals_swin_det_reference_at_256x288():
    torch.manual_seed(0)
    model = cs.swin_tiny(out_norms=True, **SMALL).eval()  # window_pad="before_shift" is the default
    for module in model.modules():  # random LayerNorm affines, so each norm matters
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    # maps 64x72, 32x36, 16x18, 8x9: no side a multiple of 7, every side larger than the window (where Swin-Det's
    # never-clamped window and the classification rule we share with timm agree; see the coswin module docstring)
    x = torch.randn(1, 3, 256, 288)
    with torch.no_grad():
        expected = _swin_det_forward(model, x)
        for fused in (True, False):
            model.fused_attn = fused
            for a, b in zip(model.forward_intermediates(x, intermediates_only=True), expected, strict=True):
                _close(a, b)


def test_window_pad_orders_differ_at_224x320_and_agree_on_window_multiples():
    torch.manual_seed(0)
    before = cs.swin_tiny(**SMALL).eval()
    after = cs.swin_tiny(window_pad="after_shift", **SMALL).eval()
    after.load_state_dict(before.state_dict())
    with torch.no_grad():
        odd = torch.randn(1, 3, 224, 320)
        assert (before.forward_features(odd) - after.forward_features(odd)).abs().max() > 1e-2
        square = torch.randn(1, 3, 224, 224)  # 56, 28, 14, 7: window multiples, nothing padded
        torch.testing.assert_close(before.forward_features(square), after.forward_features(square), atol=1e-6, rtol=0)


# -- torch.compile ----------------------------------------------------------------------------------------------------


def test_compile_fullgraph_has_no_graph_break_and_equals_eager():
    """fullgraph=True makes dynamo raise on any graph break; the "eager" backend keeps this to the graph capture."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = florence.create_model("coswin_test").eval()
    x = torch.randn(2, 3, 56, 72)  # maps 14x18, 7x9, 4x5, 2x3: padding, shifts and clamped windows
    with torch.no_grad():
        _close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))


@pytest.mark.slow
def test_compile_fullgraph_backward_equals_eager():
    """AOT autograd traces the backward too (through the custom token gather), in timm's window_pad order.
    (Inductor is not run here: its C++ build takes minutes on a shared 2-core machine; by hand it matched within
    1e-6.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = florence.create_model("coswin_test", window_pad="after_shift").train()  # no dropout: deterministic
    x = torch.randn(2, 3, 56, 72)
    eager = model(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    _close(out, eager.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)

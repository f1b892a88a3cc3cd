"""FPN (mmdet semantics) and Dynamic Head (official DynamicHead semantics), checked against independent derivations:
hand-worked numbers, ``torchvision.ops.deform_conv2d`` / ``F.conv2d`` / ``F.group_norm`` called directly with the
weights pulled out of the state dict, and the official CUDA kernel's offset indexing written out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from florence.adapters.deform_conv import set_deform_impl
from florence.adapters.dyhead import DyHead, DyHeadBlock, DyReLU, ScaleAttention, hard_sigmoid
from florence.adapters.fpn import FPN

pytestmark = pytest.mark.usefixtures("one_thread_module")

C = 16  # GroupNorm(16) needs a multiple of 16


# -- FPN ---------------------------------------------------------------------------------------------------------


def _inputs(sizes=((13, 17), (7, 9), (4, 5)), chans=(4, 6, 8), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(chans, sizes)]


def _nearest(x, size):
    """Nearest upsampling as PyTorch defines it: source index floor(i * in / out)."""
    h, w = x.shape[-2:]
    rows = torch.tensor([math.floor(i * h / size[0]) for i in range(size[0])])
    cols = torch.tensor([math.floor(j * w / size[1]) for j in range(size[1])])
    return x[:, :, rows][:, :, :, cols]


def _conv1x1(x, weight, bias):
    return torch.einsum("oi,bihw->bohw", weight[:, :, 0, 0], x) + bias[None, :, None, None]


def test_fpn_shapes_and_one_level_by_hand():
    xs = _inputs()
    fpn = FPN([4, 6, 8], out_channels=C, num_outs=5)
    outs = fpn(xs)
    assert [tuple(o.shape) for o in outs] == [(2, C, 13, 17), (2, C, 7, 9), (2, C, 4, 5), (2, C, 2, 3), (2, C, 1, 2)]
    sd = fpn.state_dict()
    lat = [_conv1x1(x, sd[f"lateral_convs.{i}.weight"], sd[f"lateral_convs.{i}.bias"]) for i, x in enumerate(xs)]
    top4 = lat[1] + _nearest(lat[2], (7, 9))  # P4 = conv3x3(L4 + up(L5))
    p4 = F.conv2d(top4, sd["fpn_convs.1.weight"], sd["fpn_convs.1.bias"], padding=1)
    torch.testing.assert_close(outs[1], p4, rtol=1e-5, atol=1e-5)
    top3 = lat[0] + _nearest(top4, (13, 17))  # the top-down sum, not the raw lateral, flows down
    p3 = F.conv2d(top3, sd["fpn_convs.0.weight"], sd["fpn_convs.0.bias"], padding=1)
    torch.testing.assert_close(outs[0], p3, rtol=1e-5, atol=1e-5)
    p6 = F.conv2d(outs[2], sd["fpn_convs.3.weight"], sd["fpn_convs.3.bias"], stride=2, padding=1)  # on_output
    torch.testing.assert_close(outs[3], p6, rtol=1e-5, atol=1e-5)
    p7 = F.conv2d(outs[3], sd["fpn_convs.4.weight"], sd["fpn_convs.4.bias"], stride=2, padding=1)  # no ReLU
    torch.testing.assert_close(outs[4], p7, rtol=1e-5, atol=1e-5)


def test_fpn_extra_level_variants():
    xs = _inputs()
    relu = FPN([4, 6, 8], C, relu_before_extra_convs=True)  # detectron2's LastLevelP6P7("p5")
    outs = relu(xs)
    sd = relu.state_dict()
    torch.testing.assert_close(outs[4], F.conv2d(outs[3].clamp(min=0), sd["fpn_convs.4.weight"], sd["fpn_convs.4.bias"],
                                                 stride=2, padding=1), rtol=1e-5, atol=1e-5)
    on_input = FPN([4, 6, 8], C, add_extra_convs="on_input")
    assert on_input.fpn_convs[3].in_channels == 8
    sd = on_input.state_dict()
    torch.testing.assert_close(on_input(xs)[3], F.conv2d(xs[2], sd["fpn_convs.3.weight"], sd["fpn_convs.3.bias"],
                                                         stride=2, padding=1), rtol=1e-5, atol=1e-5)
    pooled = FPN([4, 6, 8], C, add_extra_convs=False)
    outs = pooled(xs)
    assert len(pooled.fpn_convs) == 3
    torch.testing.assert_close(outs[3], outs[2][:, :, ::2, ::2])
    torch.testing.assert_close(outs[4], outs[3][:, :, ::2, ::2])
    assert len(FPN([4, 6, 8], C, num_outs=3).fpn_convs) == 3
    with pytest.raises(ValueError, match="add_extra_convs"):
        FPN([4, 6, 8], C, add_extra_convs="on_top")
    with pytest.raises(ValueError, match="input levels"):
        FPN([4, 6, 8], C)(xs[:2])


def test_fpn_init_is_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    fpn = FPN([64, 96, 128], 64)
    for conv in list(fpn.lateral_convs) + list(fpn.fpn_convs):
        fan_in = conv.in_channels * conv.kernel_size[0] ** 2
        fan_out = conv.out_channels * conv.kernel_size[0] ** 2
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.count_nonzero(conv.bias) == 0
    assert [k for k in fpn.state_dict() if "fpn_convs.4" in k] == ["fpn_convs.4.weight", "fpn_convs.4.bias"]


# -- attentions --------------------------------------------------------------------------------------------------


def test_hard_sigmoid_is_relu6_of_x_plus_3_over_6():
    x = torch.tensor([-10.0, -4.0, -3.0, -1.5, 0.0, 1.5, 2.4, 3.0, 7.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.0])  # min(max(x + 3, 0), 6) / 6 by hand
    torch.testing.assert_close(hard_sigmoid(x), expected)


def _force_dyrelu(dyrelu, value):
    """Make the DyReLU's hard-sigmoid output a constant: fc2 weight 0, bias at the hsig pre-image of ``value``."""
    with torch.no_grad():
        dyrelu.fc2.weight.zero_()
        dyrelu.fc2.bias.fill_(6 * value - 3)


def test_dyrelu_at_half_is_relu_and_init_coefficients():
    dyrelu = DyReLU(C)
    x = torch.randn(2, C, 5, 6)
    _force_dyrelu(dyrelu, 0.5)  # SPEC §10.1: a1 = 1, b1 = 0, a2 = 0, b2 = 0
    a1, b1, a2, b2 = dyrelu.coefficients(x)
    assert a1.shape == (2, C, 1, 1)
    for coef, value in ((a1, 1.0), (b1, 0.0), (a2, 0.0), (b2, 0.0)):
        torch.testing.assert_close(coef, torch.full_like(coef, value))
    torch.testing.assert_close(dyrelu(x), x.clamp(min=0))
    _force_dyrelu(dyrelu, 1.0)  # a1 = (1 - .5) * 2 + 1 = 2, a2 = (1 - .5) * 2 + 0 = 1, b = 1 - .5 = .5
    torch.testing.assert_close(dyrelu(x), torch.maximum(2 * x + 0.5, x + 0.5))
    _force_dyrelu(dyrelu, 0.0)  # a1 = 0, a2 = -1, b = -0.5
    torch.testing.assert_close(dyrelu(x), torch.maximum(torch.full_like(x, -0.5), -x - 0.5))


def test_dyrelu_coefficients_by_hand():
    dyrelu = DyReLU(C)  # fc1: C -> C/4 (reduction 4), fc2: C/4 -> 4C
    assert dyrelu.fc1.weight.shape == (C // 4, C) and dyrelu.fc2.weight.shape == (4 * C, C // 4)
    x = torch.randn(1, C, 3, 4)
    with torch.no_grad():
        dyrelu.fc1.weight.fill_(1.0 / C)
        dyrelu.fc1.bias.zero_()  # fc1 output: mean of the channel means = mean(x), on each of the C/4 units
        dyrelu.fc2.weight.fill_(1.0)
        dyrelu.fc2.bias.copy_(torch.linspace(-4, 4, 4 * C))
    m = max(x.mean().item(), 0.0) * (C // 4)  # ReLU, then the sum over C/4 units
    y = [min(max(m + b + 3, 0.0), 6.0) / 6 for b in torch.linspace(-4, 4, 4 * C).tolist()]
    a1, b1, a2, b2 = dyrelu.coefficients(x)
    torch.testing.assert_close(a1.flatten(), torch.tensor([(v - 0.5) * 2 + 1 for v in y[:C]]))
    torch.testing.assert_close(b1.flatten(), torch.tensor([v - 0.5 for v in y[C:2 * C]]))
    torch.testing.assert_close(a2.flatten(), torch.tensor([(v - 0.5) * 2 for v in y[2 * C:3 * C]]))
    torch.testing.assert_close(b2.flatten(), torch.tensor([v - 0.5 for v in y[3 * C:]]))


def test_scale_attention_by_hand():
    attn = ScaleAttention(2)
    x = torch.stack([torch.full((2, 3), 1.0), torch.arange(6.0).view(2, 3)])[None]  # channel means 1.0 and 2.5
    with torch.no_grad():
        attn.conv.weight.copy_(torch.tensor([0.4, 0.2]).view(1, 2, 1, 1))
        attn.conv.bias.fill_(0.1)
    # 0.4 * 1 + 0.2 * 2.5 + 0.1 = 1.0 -> relu 1.0 -> (1 + 3) / 6
    torch.testing.assert_close(attn(x), torch.full((1, 1, 1, 1), 4 / 6))
    with torch.no_grad():
        attn.conv.bias.fill_(-5.0)  # negative -> ReLU 0 -> hsig(0) = 0.5: never below one half
    torch.testing.assert_close(attn(x), torch.full((1, 1, 1, 1), 0.5))


# -- a block against an independent derivation -------------------------------------------------------------------


def _official_read(buf, channels, size):
    """The official kernel's read of a per-image buffer for output ``size``: element ((ch * h) + y) * w + x."""
    h, w = size
    ch, y, x = torch.meshgrid(torch.arange(channels), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.take(buf, (ch * h + y) * w + x)  # channels, h, w


def _reference_block(sd, levels, mode, groups=16):
    """One DyHead block from its state dict with plain ops, level by level and (for the offsets) image by image."""

    def spatial(name, x, offset, mask, stride):
        y = deform_conv2d(x, offset, sd[f"{name}.conv.weight"], sd[f"{name}.conv.bias"], stride=stride, padding=1,
                          mask=mask)
        return F.group_norm(y, groups, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"])

    def scale(f):
        s = (f.mean(dim=(2, 3)) @ sd["scale_attn.conv.weight"].flatten() + sd["scale_attn.conv.bias"]).clamp(min=0)
        return ((s + 3) / 6).clamp(0, 1)[:, None, None, None]

    def dyrelu(x):
        hidden = (x.mean(dim=(2, 3)) @ sd["task_attn.fc1.weight"].T + sd["task_attn.fc1.bias"]).clamp(min=0)
        y = ((hidden @ sd["task_attn.fc2.weight"].T + sd["task_attn.fc2.bias"] + 3) / 6).clamp(0, 1)
        c = x.shape[1]
        a1, b1, a2, b2 = (y[:, i * c:(i + 1) * c, None, None] for i in range(4))
        first, second = x * (2 * a1) + (b1 - 0.5), x * (2 * a2 - 1) + (b2 - 0.5)
        return torch.where(first > second, first, second)

    outs = []
    for l, x in enumerate(levels):
        H, W = x.shape[-2:]
        om = F.conv2d(x, sd["offset.weight"], sd["offset.bias"], padding=1)
        offset, mask = om[:, :18], torch.sigmoid(om[:, 18:])
        feats = [spatial("spatial_mid", x, offset, mask, 1)]
        if l > 0:
            feats.append(spatial("spatial_low", levels[l - 1], offset, mask, 2))
        if l + 1 < len(levels):
            up = levels[l + 1]
            h, w = up.shape[-2:]
            if mode == "resize":
                big = F.interpolate(up, size=(H, W), mode="bilinear", align_corners=True)
                high = spatial("spatial_high", big, offset, mask, 1)
            else:
                if mode == "slice":
                    o, m = offset[..., :h, :w], mask[..., :h, :w]
                else:  # per image: the kernel indexes offset[b].data_ptr() with the output size
                    o = torch.stack([_official_read(offset[b].contiguous().flatten(), 18, (h, w))
                                     for b in range(x.shape[0])])
                    m = torch.stack([_official_read(mask[b].contiguous().flatten(), 9, (h, w))
                                     for b in range(x.shape[0])])
                high = F.interpolate(spatial("spatial_high", up, o, m, 1), size=(H, W), mode="bilinear",
                                     align_corners=True)
            feats.append(high)
        outs.append(dyrelu(sum(f * scale(f) for f in feats) / len(feats)))
    return outs


def _levels(sizes=((9, 11), (5, 6), (3, 3)), batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, C, h, w, generator=g) for h, w in sizes]


def _randomize(block, seed=2):
    """Random, non-trivial weights everywhere (GN affine and biases too), offsets of a few pixels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = 0.3 if name.startswith("offset") else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm.weight") else 0.0))


@pytest.mark.parametrize("impl", ["torch", "torchvision"])
@pytest.mark.parametrize("mode", ["official", "slice", "resize"])
def test_block_equals_independent_derivation(mode, impl):
    block = DyHeadBlock(C, high_offsets=mode)
    _randomize(block)
    set_deform_impl(block, impl)
    levels = _levels()
    out = block(levels)
    ref = _reference_block(block.state_dict(), levels, mode)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_high_offset_modes_differ_and_official_is_per_image():
    levels = _levels()
    outs = {}
    for mode in ("official", "slice", "resize"):
        block = DyHeadBlock(C, high_offsets=mode)
        _randomize(block)
        outs[mode] = block(levels)
    for a, b in (("official", "slice"), ("official", "resize"), ("slice", "resize")):
        assert (outs[a][0] - outs[b][0]).abs().max() > 1e-2, (a, b)  # level 0 has a coarser neighbour
    torch.testing.assert_close(outs["official"][-1], outs["slice"][-1])  # the coarsest level has none
    # per image, not a prefix of the whole batch: image 1 alone gives image 1's result
    block = DyHeadBlock(C, high_offsets="official")
    _randomize(block)
    alone = block([x[1:] for x in levels])
    torch.testing.assert_close(outs["official"][0][1:], alone[0], rtol=1e-5, atol=1e-5)


def test_zero_offsets_half_mask_is_half_a_plain_conv():
    block = DyHeadBlock(C, high_offsets="official")
    _randomize(block)
    with torch.no_grad():
        block.offset.weight.zero_()
        block.offset.bias.zero_()  # offsets 0, masks sigmoid(0) = 0.5
    levels = _levels()
    x = levels[0]
    om = block.offset(x)
    got = block.spatial_mid(x, om[:, :18], om[:, 18:].sigmoid())
    sd = block.state_dict()
    plain = 0.5 * F.conv2d(x, sd["spatial_mid.conv.weight"], padding=1) + sd["spatial_mid.conv.bias"][:, None, None]
    expected = F.group_norm(plain, 16, sd["spatial_mid.norm.weight"], sd["spatial_mid.norm.bias"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    slice_block = DyHeadBlock(C, high_offsets="slice")
    slice_block.load_state_dict(sd)
    for a, b in zip(block(levels), slice_block(levels)):  # constant offsets / masks: every prefix is the same
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["official", "slice", "resize"])
def test_block_output_shapes_odd_sizes(mode):
    levels = _levels(sizes=((13, 17), (7, 9), (4, 5), (2, 3), (1, 2)), batch=1)
    head = DyHead(C, num_blocks=2, high_offsets=mode)
    outs = head(levels)
    assert [tuple(o.shape) for o in outs] == [(1, C, 13, 17), (1, C, 7, 9), (1, C, 4, 5), (1, C, 2, 3), (1, C, 1, 2)]
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_dyhead_keys_identity_and_errors():
    head = DyHead(C, num_blocks=2)
    keys = set(head.state_dict())
    for j in range(2):
        for part in ("spatial_high", "spatial_mid", "spatial_low"):
            assert {f"blocks.{j}.{part}.conv.weight", f"blocks.{j}.{part}.norm.bias"} <= keys
        assert {f"blocks.{j}.offset.weight", f"blocks.{j}.scale_attn.conv.weight", f"blocks.{j}.task_attn.fc1.weight",
                f"blocks.{j}.task_attn.fc2.weight"} <= keys
    assert head.blocks[0].offset.weight.shape == (27, C, 3, 3)
    assert head.blocks[0].spatial_low.conv.stride == 2 and head.blocks[0].spatial_high.conv.stride == 1
    levels = _levels()
    assert all(a is b for a, b in zip(DyHead(C, num_blocks=0)(levels), levels))
    with pytest.raises(ValueError, match="stride-2 size"):
        head([levels[0], levels[2]])
    with pytest.raises(ValueError, match="high_offsets"):
        DyHead(C, high_offsets="upsample")
    with pytest.raises(ValueError, match="init"):
        DyHead(C, init="xavier")
    with pytest.raises(ValueError, match="multiple of 16"):
        DyHead(24)


# -- initialisation ----------------------------------------------------------------------------------------------


def test_init_official():
    torch.manual_seed(0)
    block = DyHead(64, num_blocks=1, init="official").blocks[0]
    fan_in = 64 * 9
    # offset conv: PyTorch's default Conv2d init, uniform +-1/sqrt(fan_in) (kaiming_uniform a=sqrt(5)), bias too
    assert block.offset.weight.abs().max() <= 1 / math.sqrt(fan_in)
    assert block.offset.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
    assert block.offset.bias.abs().max() > 0
    assert block.scale_attn.conv.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert torch.count_nonzero(block.scale_attn.conv.bias) == 0
    for spatial in (block.spatial_high, block.spatial_mid, block.spatial_low):  # the DCN's own reset
        assert spatial.conv.weight.abs().max() <= 1 / math.sqrt(fan_in)
        assert spatial.conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
        assert torch.count_nonzero(spatial.conv.bias) == 0
        assert torch.all(spatial.norm.weight == 1) and torch.count_nonzero(spatial.norm.bias) == 0
    fc1 = block.task_attn.fc1  # nn.Linear default
    assert fc1.weight.abs().max() <= 1 / math.sqrt(64) and fc1.bias.abs().max() > 0


def test_init_mmdet_and_zero_offset():
    torch.manual_seed(0)
    block = DyHead(64, num_blocks=1, init="mmdet").blocks[0]
    for m in (block.offset, block.scale_attn.conv, block.task_attn.fc1, block.task_attn.fc2):
        assert m.weight.std().item() == pytest.approx(0.01, rel=0.3)
        assert torch.count_nonzero(m.bias) == 0
    assert block.spatial_mid.conv.weight.abs().max() <= 1 / math.sqrt(64 * 9)
    assert block.spatial_mid.conv.weight.std() > 0.02  # uniform DCN reset, not N(0, 0.01)
    for init in ("official", "mmdet"):
        zero = DyHead(C, num_blocks=2, init=init, zero_init_offset=True)
        assert all(torch.count_nonzero(b.offset.weight) + torch.count_nonzero(b.offset.bias) == 0 for b in zero.blocks)

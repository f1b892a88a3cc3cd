"""Video CoSwin / Video Swin (``backbone/video_coswin.py``, ``backbone/video_inflate.py``): the properties that would
catch a wrong inflation or a wrong 3D window, and parity with mmaction2's Video Swin.

References are written independently of our code: mmaction2's ``mmaction/models/backbones/swin.py`` re-expressed with
plain torch in ``benchmarks/perf/video_reference.py`` (``torch.roll`` + view/permute partition, the 27-region
``compute_mask``, an explicit masked softmax, Video Swin's relative-index construction, I3D average pool + fc), and
the 2D tower run frame by frame.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from florence.backbone.convert import resize_relative_position_table
from florence.backbone.coswin import partition_keeps_order
from florence.backbone.video_coswin import (
    get_window_size, relative_position_index_3d, shift_attention_mask_3d, window_geometry_3d, window_partition_3d,
    window_reverse_3d,
)
from florence.backbone.video_inflate import load_video_tower_weights, mmaction2_to_florence
from florence.benchmarks.perf.video_reference import (
    MMAction2VideoSwin, reference_compute_mask, reference_get_window_size, reference_relative_position_index,
    reference_window_partition,
)
from florence.factory import create_model
from florence.weights import WeightsError

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY_SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=(2, 3, 3))  # mmaction2 arch dict + window


def _randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter moved by N(0, std): random bias tables and norms, so a swapped axis or a wrong key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def _inflated_pair(embed: str, **video_kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random 2D ``coswin_test`` (float64) and ``video_coswin_test`` inflated from it."""
    image = _randomize(create_model("coswin_test", embed=embed)).double()
    video = create_model("video_coswin_test", embed=embed, **video_kwargs).double().eval()
    report = load_video_tower_weights(video, image, format="inflate")
    assert not report.missing and not report.unexpected and not report.newly_initialized
    return image, video


def _static_clip(image: torch.Tensor, frames: int) -> torch.Tensor:
    return image[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()  # B, 3, T, H, W


# ----------------------------------------------------------------------------------------------------------------
# identical frames: the inflated model is the 2D model at every temporal position


@pytest.mark.parametrize("embed", ["conv", "patch"])
@pytest.mark.parametrize("frames", [8, 16])
def test_identical_frames_give_the_2d_features_at_every_time(embed, frames):
    """Holds exactly when every temporal window is full of real frames (T' = 4 clamped to the window (4, 7, 7), or
    T' = 8 a multiple of it, shifted by 2 with the 27-region mask), the spatial windows are the 2D model's (56 px:
    14 -> 7 -> 4 -> 2 tokens, window 7) and the conv embeddings replicate the edge frames: kernels summed over time
    give the 2D kernel, and a key repeated over time with the same (tiled) bias leaves the softmax unchanged.
    Float64, so rounding does not hide a small error (float32 agrees to ~1e-5)."""
    image, video = _inflated_pair(embed)
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        want = image.forward_features(x)  # B, 2, 2, 8C
        got = video.forward_features(_static_clip(x, frames))  # B, T', 2, 2, 8C
    assert got.shape == (2, frames // 2, *want.shape[1:])
    assert (got - want[:, None]).abs().max() < 1e-5
    with torch.no_grad():  # and so the pooled features
        assert torch.allclose(video(_static_clip(x, frames)), image(x), atol=1e-5)


def test_identical_frames_with_zero_temporal_padding_differ_at_the_boundary():
    """Where it does NOT hold: ``temporal_pad="zeros"`` (I3D) with the merge kernel 3 along time. After the first
    merge, the first and last frames see a zero frame in place of a copy (2/3 of the inflated kernel), the interior
    frames are still the 2D response; attention then mixes the boundary into every position of the window, so the
    final features differ everywhere. With "replicate" every frame equals the 2D response."""
    x = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    for pad in ("replicate", "zeros"):
        image, video = _inflated_pair("conv", temporal_pad=pad)
        with torch.no_grad():
            want = image.layers[1].downsample(image.layers[0](image.patch_embed(x)))  # B, 7, 7, 2C
            got = video.layers[1].downsample(video.layers[0](video.patch_embed(_static_clip(x, 16))))  # B, 8, 7, 7, 2C
            err = (got - want[:, None]).abs().amax(dim=(0, 2, 3, 4))  # per frame
            final = (video.forward_features(_static_clip(x, 16)) - image.forward_features(x)[:, None]).abs().max()
        if pad == "replicate":
            assert err.max() < 1e-9 and final < 1e-5
        else:
            assert err[0] > 1e-2 and err[-1] > 1e-2 and err[1:-1].max() < 1e-9
            assert final > 1e-2


def test_identical_frames_with_temporal_padding_of_the_window_differ():
    """Nor when T' is not a multiple of the temporal window: 12 frames -> T' = 6 with window 4 pads two all-zero
    frames that take part in attention unmasked (Video Swin pads after norm1 and does not mask padding)."""
    image, video = _inflated_pair("conv")
    x = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        err = (video.forward_features(_static_clip(x, 12)) - image.forward_features(x)[:, None]).abs().max()
    assert err > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# 3D window helpers vs Video Swin's definitions

SIZES = [  # (padded-or-not map size, configured window)
    ((4, 6, 6), (2, 3, 3)),
    ((3, 7, 5), (2, 3, 3)),  # padding on every axis
    ((8, 14, 14), (8, 7, 7)),  # temporal axis clamped (no temporal shift)
    ((6, 10, 4), (4, 7, 7)),  # width clamped to 4
    ((16, 56, 56), (8, 7, 7)),  # Video Swin-T stage 1 at 32 x 224^2
    ((2, 2, 2), (4, 7, 7)),  # everything clamped: no shift at all
]


def test_window_partition_and_reverse_round_trip():
    x = torch.randn(2, 4, 6, 9, 5)
    for window in [(1, 1, 1), (2, 3, 3), (4, 2, 9), (4, 6, 9)]:
        windows = window_partition_3d(x, window)
        num_windows = (4 // window[0]) * (6 // window[1]) * (9 // window[2])
        assert windows.shape == (2 * num_windows, window[0] * window[1] * window[2], 5)
        assert torch.equal(windows, reference_window_partition(x, window))
        assert torch.equal(window_reverse_3d(windows, window, 4, 6, 9), x)
    # the first window holds x[:, :wd, :wh, :ww] in (d, h, w) row-major order
    assert torch.equal(window_partition_3d(x, (2, 3, 3))[0], x[0, :2, :3, :3].reshape(18, 5))


@pytest.mark.parametrize("size,window_size", SIZES)
def test_shift_mask_equals_video_swin_compute_mask(size, window_size):
    """Ours labels one region per unshifted axis; Video Swin loops over slice(-w), slice(-w, -0) (empty) and
    slice(-0, None) (everything, relabelled) even when the shift is 0: different labels, the same partition of the
    map into regions, so the same 0 / -100 mask."""
    window, shift = get_window_size(size, window_size, tuple(w // 2 for w in window_size))
    padded = tuple(-(-s // w) * w for s, w in zip(size, window))
    ours = shift_attention_mask_3d(padded, window, shift)
    ref = reference_compute_mask(*padded, window, shift)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)
    if any(shift):
        assert (ours == -100).any()
    if padded[0] * padded[1] * padded[2] > 1000:
        return
    # small maps: also every other shift on each axis (not just window // 2)
    for s in itertools.product(*(range(w) for w in window)):
        assert torch.equal(shift_attention_mask_3d(padded, window, s), reference_compute_mask(*padded, window, s))


@pytest.mark.parametrize("window", [(1, 1, 1), (2, 3, 3), (8, 7, 7), (4, 14, 14), (3, 2, 5)])
def test_relative_position_index_equals_video_swin(window):
    ours = relative_position_index_3d(window)
    ref = reference_relative_position_index(window)
    assert torch.equal(ours, ref)
    assert ours.min() == 0 and ours.max() == (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1) - 1


def test_clamped_window_reads_the_same_offsets_of_the_full_table():
    """A window clamped to (d, h, w) reads, in the full table, the rows of its own relative offsets: the full
    window's index restricted to a sub-window at the origin. mmaction2 reads the top-left ``[:N, :N]`` block
    instead, which is that sub-window only when the temporal axis alone is clamped (its index is the slowest)."""
    full = (8, 7, 7)
    ref = reference_relative_position_index(full)
    grid = torch.arange(8 * 7 * 7).view(full)
    for small in [(4, 7, 7), (8, 4, 7), (2, 3, 5)]:
        sub = grid[:small[0], :small[1], :small[2]].flatten()
        ours = relative_position_index_3d(small, full)
        assert torch.equal(ours, ref[sub][:, sub])
        N = sub.numel()
        assert torch.equal(ours, ref[:N, :N]) == (small[1:] == full[1:])


def test_get_window_size_is_video_swins_clamping():
    assert get_window_size((8, 56, 56), (8, 7, 7), (4, 3, 3)) == ((8, 7, 7), (0, 3, 3))  # equal size: clamp, no shift
    assert get_window_size((16, 56, 56), (8, 7, 7), (4, 3, 3)) == ((8, 7, 7), (4, 3, 3))
    assert get_window_size((4, 7, 10), (8, 7, 7), (4, 3, 3)) == ((4, 7, 7), (0, 0, 3))
    assert get_window_size((1, 2, 3), (8, 7, 7), (4, 3, 3)) == ((1, 2, 3), (0, 0, 0))
    for size in itertools.product((1, 3, 7, 8, 9), repeat=3):
        assert get_window_size(size, (8, 7, 3), (4, 3, 1)) == reference_get_window_size(size, (8, 7, 3), (4, 3, 1))


@pytest.mark.parametrize("size,window_size", SIZES)
def test_gather_equals_roll_and_partition(size, window_size):
    """The precomputed token gathers (regular and shifted) equal ``F.pad`` + ``torch.roll(-shift)`` +
    ``window_partition_3d`` on the padded map, and their inverses put every token back."""
    geo = window_geometry_3d(size, window_size)
    window, shift = reference_get_window_size(size, window_size, tuple(w // 2 for w in window_size))
    assert (geo.window, geo.shift) == (window, shift)
    assert geo.padded == tuple(-(-s // w) * w for s, w in zip(size, window))
    B, C = 2, 3
    x = torch.randn(B, *size, C)
    Dp, Hp, Wp = geo.padded
    x = torch.nn.functional.pad(x, (0, 0, 0, Wp - size[2], 0, Hp - size[1], 0, Dp - size[0]))
    flat = x.reshape(B, Dp * Hp * Wp, C)
    for order, s in ((geo.regular, (0, 0, 0)), (geo.shifted, shift)):
        if order is None:  # no shifted order without a shift
            assert not any(shift) and geo.shift_mask is None
            continue
        want = reference_window_partition(torch.roll(x, [-v for v in s], dims=(1, 2, 3)), window).view(B, -1, C)
        got = flat if order.order is None else flat[:, order.order]
        assert torch.equal(got, want)
        back = got if order.inverse is None else got[:, order.inverse]
        assert torch.equal(back, flat)
    if any(shift):
        assert torch.equal(geo.shift_mask, reference_compute_mask(Dp, Hp, Wp, window, shift))


# ----------------------------------------------------------------------------------------------------------------
# parity with mmaction2's Video Swin


@pytest.fixture(scope="module")
def mmaction2_pair():
    """A random mmaction2-keyed tiny Video Swin (reference) and ``video_swin_tiny`` loaded from its state dict."""
    torch.manual_seed(0)
    ref = MMAction2VideoSwin(**TINY_SWIN, num_classes=5).randomize(seed=1).eval()
    ours = create_model("video_swin_tiny", **TINY_SWIN, num_classes=5).eval()
    report = load_video_tower_weights(ours, ref.state_dict(), format="mmaction2")
    assert not report.missing and not report.unexpected and not report.newly_initialized
    return ref, ours


def test_mmaction2_state_dict_keys_and_shapes(mmaction2_pair):
    """The keys and shapes of mmaction2's module definition, and where they land in ours."""
    ref, ours = mmaction2_pair
    sd = ref.state_dict()
    assert sd["backbone.patch_embed.proj.weight"].shape == (16, 3, 2, 4, 4)
    assert sd["backbone.layers.0.blocks.1.attn.relative_position_bias_table"].shape == (3 * 5 * 5, 1)
    assert sd["backbone.layers.1.blocks.0.attn.relative_position_index"].shape == (18, 18)
    assert sd["backbone.layers.0.downsample.reduction.weight"].shape == (32, 64)  # end of stage 0, no bias
    assert "backbone.layers.1.downsample.reduction.weight" not in sd  # the last stage has none
    assert sd["backbone.norm1.weight"].shape == (32,)  # mmaction2 1.x: norm{out_index}; norm3 for 4 stages
    assert sd["cls_head.fc_cls.weight"].shape == (5, 32)
    converted = mmaction2_to_florence(sd)
    assert set(converted) == set(ours.state_dict())
    moved = converted["layers.1.downsample.reduction.weight"]  # ours: at the start of the next stage
    assert torch.equal(moved, sd["backbone.layers.0.downsample.reduction.weight"])
    assert torch.equal(converted["norm.weight"], sd["backbone.norm1.weight"])
    assert torch.equal(converted["head.fc.weight"], sd["cls_head.fc_cls.weight"])
    # the original Video Swin repository calls the output norm "norm": the same tower
    legacy = {k.replace("backbone.norm1.", "backbone.norm."): v for k, v in sd.items()}
    assert set(mmaction2_to_florence(legacy)) == set(converted)


@pytest.mark.parametrize("shape", [
    (1, 3, 8, 24, 24),  # no padding; stage 2 is 3x3: the spatial window fits exactly (no shift there)
    (2, 3, 10, 28, 20),  # padding everywhere: patch embed (T 10 -> 5 -> padded to 6), windows, odd patch merging
    (1, 3, 2, 24, 24),  # T' = 1: the temporal window clamped to 1 (mmaction2's [:N, :N] reads the same rows)
])
@pytest.mark.parametrize("fused", [True, False])
def test_logits_equal_mmaction2(mmaction2_pair, shape, fused):
    ref, ours = mmaction2_pair
    ours.fused_attn = fused
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    ours.fused_attn = True
    assert got.shape == (shape[0], 5)
    assert want.abs().max() > 0.1  # not a degenerate comparison
    assert (got - want).abs().max() < 1e-5


def test_input_gradients_equal_mmaction2(mmaction2_pair):
    """The backward pass (our custom gather autograd, SDPA / eager bias gradient path) matches too."""
    ref, ours = mmaction2_pair
    w = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    grads = []
    for model in (ref, ours):
        x = torch.randn(2, 3, 10, 28, 20, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        (model(x) * w).sum().backward()
        grads.append(x.grad)
        model.zero_grad(set_to_none=True)
    assert (grads[0] - grads[1]).abs().max() < 1e-5 * grads[0].abs().max().clamp(min=1)


def test_spatially_clamped_window_is_our_documented_deviation(mmaction2_pair):
    """16 x 16 px: stage 2 is 2 x 2 < the 3 x 3 window. We read the bias of the same relative offsets (the table's
    centre, as the 2D tower); mmaction2 reads the top-left ``[:N, :N]`` index block, other offsets' rows. Not a case
    the named models meet at 224 px (module docstring); asserted so that a change of either side is noticed."""
    ref, ours = mmaction2_pair
    x = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# inflation LoadReport


def test_inflation_report_and_tensors():
    """A CoSwin checkpoint into the conv model: every conv kernel and bias table inflated (and listed), the rest
    copied; the 3D kernel sums over time to the 2D kernel; tables resized to a new spatial window, then tiled."""
    image = _randomize(create_model("coswin_test"))
    video = create_model("video_coswin_test", window_size=(2, 5, 5))
    report = load_video_tower_weights(video, image, format="inflate")
    tables = sorted(k for k in video.state_dict() if k.endswith("relative_position_bias_table"))
    convs = ["layers.1.downsample.proj.weight", "layers.2.downsample.proj.weight", "layers.3.downsample.proj.weight",
             "patch_embed.proj.weight"]
    assert report.inflated == sorted(tables + convs)
    assert report.resized == tables  # 2D window 7 -> 5
    assert not report.missing and not report.unexpected and not report.newly_initialized and not report.skipped
    assert set(report.loaded) == set(video.state_dict())
    state, image_state = video.state_dict(), image.state_dict()
    assert state["patch_embed.proj.weight"].shape == (32, 3, 2, 7, 7)
    assert torch.allclose(state["patch_embed.proj.weight"].sum(2), image_state["patch_embed.proj.weight"], atol=1e-6)
    merge = "layers.2.downsample.proj.weight"
    assert torch.allclose(state[merge].sum(2), image_state[merge], atol=1e-6)
    key = "layers.2.blocks.1.attn.relative_position_bias_table"
    assert state[key].shape == (3 * 9 * 9, 4)
    resized = resize_relative_position_table(image_state[key], (5, 5))
    for dt in range(3):  # the same spatial table for every temporal offset (the slowest index)
        assert torch.equal(state[key][dt * 81:(dt + 1) * 81], resized)
    assert torch.equal(state["layers.2.blocks.1.mlp.fc1.weight"], image_state["layers.2.blocks.1.mlp.fc1.weight"])


def test_swin_layout_into_conv_model_reports_fresh_embeddings():
    """A Swin-layout 2D tower (patch embedding, patch merging) into the conv model: Swin's embeddings cannot be
    inflated into conv embeddings; the model's conv kernels and merge norms are newly initialised, the checkpoint's
    patch-merging keys and 4x4 kernel skipped; the transformer blocks inflate and load."""
    image = create_model("coswin_test", embed="patch")
    video = create_model("video_coswin_test")
    report = load_video_tower_weights(video, image, format="inflate")
    assert not report.missing and not report.unexpected
    for i in (1, 2, 3):
        assert {f"layers.{i}.downsample.proj.weight", f"layers.{i}.downsample.proj.bias",
                f"layers.{i}.downsample.norm.weight"} <= set(report.newly_initialized)
        assert {f"layers.{i}.downsample.reduction.weight", f"layers.{i}.downsample.norm.weight"} <= set(report.skipped)
    assert "patch_embed.proj.weight" in report.newly_initialized and "patch_embed.proj.weight" in report.skipped
    assert all(k.endswith("relative_position_bias_table") for k in report.inflated) and len(report.inflated) == 5
    assert "layers.0.blocks.0.attn.qkv.weight" in report.loaded and "norm.weight" in report.loaded


def test_swin_layout_into_conv_model_leaves_the_whole_stem_fresh():
    image = create_model("coswin_test", embed="patch")
    video = create_model("video_coswin_test")
    report = load_video_tower_weights(video, image, format="inflate")
    stem = {"patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"}
    assert stem <= set(report.newly_initialized) and stem <= set(report.skipped)
    assert not stem & set(report.loaded)


def test_strict_inflation_names_the_wrong_shape_and_head_rules():
    image = create_model("coswin_test", embed="patch", num_classes=7)
    state = image.state_dict()
    same = create_model("video_coswin_test", embed="patch", num_classes=7)
    assert not load_video_tower_weights(same, state, format="inflate").newly_initialized  # head of the same shape
    other = create_model("video_coswin_test", embed="patch", num_classes=3)
    report = load_video_tower_weights(other, state, format="inflate")
    assert report.newly_initialized == ["head.fc.bias", "head.fc.weight"]
    assert {"head.fc.bias", "head.fc.weight"} <= set(report.skipped)
    bad = dict(state, **{"layers.0.blocks.0.mlp.fc1.weight": state["layers.0.blocks.0.mlp.fc1.weight"][:5]})
    with pytest.raises(WeightsError, match=r"layers\.0\.blocks\.0\.mlp\.fc1\.weight \(5, 32\) vs \(128, 32\)"):
        load_video_tower_weights(other, bad, format="inflate")
    report = load_video_tower_weights(other, bad, format="inflate", strict=False)
    assert report.unexpected == ["layers.0.blocks.0.mlp.fc1.weight"]
    assert report.missing == ["layers.0.blocks.0.mlp.fc1.weight"]


def test_identity_token_order_is_told_from_the_sizes():
    """``partition_keeps_order`` (a size rule, so the geometry traces) agrees with partitioning the row-major indices
    on every 1-3 axis map of sides 1, 2, 4, 6 and every window dividing them."""
    for axes in (1, 2, 3):
        for padded in itertools.product([1, 2, 4, 6], repeat=axes):
            for window in itertools.product(*[[d for d in range(1, p + 1) if p % d == 0] for p in padded]):
                index = torch.arange(math.prod(padded)).reshape(padded)
                blocks = index.unfold(0, window[0], window[0])  # windows along axis 0, then the next axes
                for axis in range(1, axes):
                    blocks = blocks.unfold(axis, window[axis], window[axis])
                order = blocks.reshape(-1)  # window grid row-major, then tokens within a window row-major
                assert torch.equal(order, torch.arange(order.numel())) == partition_keeps_order(padded, window), \
                    (padded, window)

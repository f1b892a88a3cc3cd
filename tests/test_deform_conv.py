"""The plain-PyTorch DCNv2 (``deform_conv2d_torch``) against torchvision's kernel and hand-worked numbers, and the
``impl`` switch of ``ModulatedDeformConv2d``.

Parity covers values and the gradients of input, offset, mask, weight and bias in float64 and float32, with offsets
that put samples outside the image, exactly on the borders (y = -1, y = H - 1, y = H) and on integer / half-integer
positions (where the offset gradient is torchvision's one-sided difference), strides 1 and 2, odd sizes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

import florence.adapters.deform_conv as dc
from florence.adapters.deform_conv import (
    ModulatedDeformConv2d, deform_conv2d_torch, resolve_deform_impl, set_deform_impl,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _case(dtype, size=(7, 9), stride=1, padding=1, dilation=1, kernel=(3, 3), channels=(3, 4), seed=0, batch=2):
    """Random input, weight, bias, mask and offsets that mix continuous values (spread 3 px, many samples outside),
    integers, half-integers and far-away values."""
    g = torch.Generator().manual_seed(seed)
    (h, w), (kh, kw), (c, o) = size, kernel, channels
    ho, wo = _out_size(h, kh, stride, padding, dilation), _out_size(w, kw, stride, padding, dilation)
    x = torch.randn(batch, c, h, w, generator=g, dtype=dtype)
    offset = torch.randn(batch, 2 * kh * kw, ho, wo, generator=g, dtype=dtype) * 3
    pick = torch.randint(0, 6, offset.shape, generator=g)
    offset = torch.where(pick == 0, offset.round(), offset)  # integer positions (incl. -1, H - 1, H)
    offset = torch.where(pick == 1, offset.round() + 0.5, offset)  # half-integer positions
    offset = torch.where(pick == 2, torch.full_like(offset, -40.25), offset)  # far outside
    mask = torch.rand(batch, kh * kw, ho, wo, generator=g, dtype=dtype)
    weight = torch.randn(o, c, kh, kw, generator=g, dtype=dtype)
    bias = torch.randn(o, generator=g, dtype=dtype)
    return x, offset, mask, weight, bias


def _sample_coords(offset, stride, padding, dilation, kernel):
    """All sampling coordinates (y, x), written the direct way: base position of tap (i, j) plus its offset."""
    kh, kw = kernel
    b, _, ho, wo = offset.shape
    ys, xs = [], []
    for i in range(kh):
        for j in range(kw):
            t = i * kw + j
            oy = torch.arange(ho, dtype=offset.dtype).view(ho, 1) * stride - padding + i * dilation
            ox = torch.arange(wo, dtype=offset.dtype).view(1, wo) * stride - padding + j * dilation
            ys.append(oy + offset[:, 2 * t])
            xs.append(ox + offset[:, 2 * t + 1])
    return torch.stack(ys), torch.stack(xs)


def _both(x, offset, mask, weight, bias, **conv):
    """Outputs and gradients (input, offset, mask, weight, bias) of torchvision's and our op for one output grad."""
    results = []
    grad_out = None
    for fn in (deform_conv2d, deform_conv2d_torch):
        leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
        out = fn(leaves[0], leaves[1], leaves[3], leaves[4], mask=leaves[2], **conv)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        results.append((out, torch.autograd.grad(out, leaves, grad_out)))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 9), (5, 6), (8, 8)])
def test_matches_torchvision_values_and_gradients(dtype, stride, size):
    x, offset, mask, weight, bias = _case(dtype, size=size, stride=stride, seed=size[0] * 10 + stride)
    y, xx = _sample_coords(offset, stride, 1, 1, (3, 3))
    h, w = size
    # the data reaches every case the kernel treats specially
    assert (y == -1).any() and (y == h - 1).any() and (y == h).any() and (xx == -1).any() and (xx == w).any()
    assert ((y == y.round()) & (y > 0) & (y < h - 1)).any() and ((xx - 0.5) == (xx - 0.5).round()).any()
    assert (y < -1).any() and (xx > w).any() and ((y > -1) & (y < 0)).any()
    (ref, ref_grads), (ours, our_grads) = _both(x, offset, mask, weight, bias, stride=stride, padding=1)
    tol = TOL[dtype]
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    for name, a, b in zip(("input", "offset", "mask", "weight", "bias"), our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("kernel, stride, padding, dilation", [((3, 3), 1, 0, 2), ((1, 3), 2, 1, 1), ((2, 3), 1, 2, 1)])
def test_matches_torchvision_other_geometries(kernel, stride, padding, dilation):
    x, offset, mask, weight, bias = _case(torch.float64, size=(9, 7), stride=stride, padding=padding,
                                          dilation=dilation, kernel=kernel)
    (ref, ref_grads), (ours, our_grads) = _both(x, offset, mask, weight, bias, stride=stride, padding=padding,
                                                dilation=dilation)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_torchvision_for_other_batches_and_channels_last_input(batch):
    x, offset, mask, weight, bias = _case(torch.float64, size=(6, 7), batch=batch, channels=(5, 2))
    (ref, ref_grads), (ours, our_grads) = _both(x.contiguous(memory_format=torch.channels_last), offset, mask, weight,
                                                bias, padding=1)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_without_mask_matches_torchvision():
    x, offset, _, weight, bias = _case(torch.float64)
    ref = deform_conv2d(x, offset, weight, bias, padding=1)
    torch.testing.assert_close(deform_conv2d_torch(x, offset, weight, bias, padding=1), ref, atol=1e-10, rtol=1e-10)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # fractional parts in [0.2, 0.8]: away from the kinks at integer coordinates
    offset = (torch.randint(-3, 3, (1, 18, 2, 3), generator=g) + 0.2 + 0.6 * torch.rand(1, 18, 2, 3, generator=g))
    offset = offset.double().requires_grad_()
    mask = torch.rand(1, 9, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: deform_conv2d_torch(t[0], t[1], t[3], t[4], stride=2, padding=1,
                                                                   mask=t[2]), (x, offset, mask, weight, bias))


def test_hand_worked_samples_and_offset_gradient():
    """1x1 kernel on [[1, 2], [3, 4]], weight 2, bias 1, mask 0.5: out = 2 * 0.5 * sample + 1."""
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    weight, bias = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    offset[0, :, 0, 0] = torch.tensor([0.25, 0.5])  # sample (0.25, 0.5): 0.75 * 1.5 + 0.25 * 3.5 = 2
    offset[0, :, 0, 1] = torch.tensor([-1.0, -1.0])  # sample (-1, 0): on the border -> 0
    offset[0, :, 1, 0] = torch.tensor([1.0, 0.0])  # sample (2, 0): y = H -> 0
    offset[0, :, 1, 1] = torch.tensor([0.5, -1.5])  # sample (1.5, -0.5): 0.5 * 0.5 * x[1, 0] = 0.75
    offset.requires_grad_()
    mask = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    out = deform_conv2d_torch(x, offset, weight, bias, mask=mask)
    assert out[0, 0].tolist() == [[3.0, 1.0], [1.0, 1.75]]
    (grad,) = torch.autograd.grad(out.sum(), offset)
    # d out / d dy = 2 * 0.5 * d sample / dy; at integer coordinates the difference towards floor(y) + 1:
    # (0, 0): x-interp of row 1 minus row 0 at x=0.5: 3.5 - 1.5 = 2;      dx: 0.75 * 1 + 0.25 * 1 = 1
    # (0, 1) at (-1, 0): row 0 minus row -1 at x=0: 1 - 0;                  dx: row -1 -> 0
    # (1, 0) at (2, 0): rows 2, 3 outside -> 0;                            dx: 0
    # (1, 1) at (1.5, -0.5): 0.5 * (0 - 3) = -1.5;                        dx: 0.5 * (3 - 0) = 1.5
    assert grad[0, 0].tolist() == [[2.0, 1.0], [0.0, -1.5]]
    assert grad[0, 1].tolist() == [[1.0, 0.0], [0.0, 1.5]]


def test_zero_offsets_are_a_conv_and_mask_scales_it():
    x, _, _, weight, bias = _case(torch.float64, size=(6, 5))
    offset = torch.zeros(2, 18, 6, 5, dtype=torch.float64)
    conv = F.conv2d(x, weight, None, padding=1)
    torch.testing.assert_close(deform_conv2d_torch(x, offset, weight, bias, padding=1,
                                                   mask=torch.ones(2, 9, 6, 5, dtype=torch.float64)),
                               conv + bias.view(1, -1, 1, 1))
    torch.testing.assert_close(deform_conv2d_torch(x, offset, weight, bias, padding=1,
                                                   mask=torch.full((2, 9, 6, 5), 0.25, dtype=torch.float64)),
                               0.25 * conv + bias.view(1, -1, 1, 1))


def test_half_pixel_offset_is_a_conv_of_the_row_average():
    """dy = -0.5 everywhere, padding 0: each tap reads the mean of rows r - 1 and r (row -1 is zero)."""
    x, _, _, weight, bias = _case(torch.float64, size=(6, 5))
    averaged = 0.5 * (x + F.pad(x[:, :, :-1], (0, 0, 1, 0)))
    offset = torch.zeros(2, 9, 2, 4, 3, dtype=torch.float64)
    offset[:, :, 0] = -0.5
    ours = deform_conv2d_torch(x, offset.flatten(1, 2), weight, bias, padding=0)
    torch.testing.assert_close(ours, F.conv2d(averaged, weight, bias))


def test_nan_offset_stays_local():
    x, offset, mask, weight, bias = _case(torch.float32)
    offset[0, 4, 2, 3] = float("nan")
    out = deform_conv2d_torch(x, offset, weight, bias, padding=1, mask=mask)
    assert out[0, :, 2, 3].isnan().all() and out.isnan().sum() == out.shape[1]


def test_shape_errors_are_reported():
    x, offset, mask, weight, bias = _case(torch.float32)
    with pytest.raises(ValueError, match="offset must be"):
        deform_conv2d_torch(x, offset[:, :, :-1], weight, bias, padding=1, mask=mask)
    with pytest.raises(ValueError, match="mask must be"):
        deform_conv2d_torch(x, offset, weight, bias, padding=1, mask=mask[:, :4])
    with pytest.raises(ValueError, match="input channels"):
        deform_conv2d_torch(x[:, :2], offset, weight, bias, padding=1, mask=mask)


def test_auto_is_torch_on_cpu_and_torchvision_on_cuda():
    assert resolve_deform_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_deform_impl("auto", torch.device("cuda")) == "torchvision"
    assert resolve_deform_impl("torchvision", torch.device("cpu")) == "torchvision"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_deform_impl("mmcv", torch.device("cpu"))


def test_module_dispatch_switch_and_state_dict(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": ModulatedDeformConv2d(3, 4), "b": torch.nn.Conv2d(3, 3, 1),
                                 "c": ModulatedDeformConv2d(4, 4, stride=2, bias=False)})
    keys = list(model.state_dict())
    assert keys == ["a.weight", "a.bias", "b.weight", "b.bias", "c.weight"]
    x, offset, mask, _, _ = _case(torch.float32, size=(5, 6), channels=(3, 4))
    reference = model["a"](x, offset, mask)
    calls = []

    def recorded(name, fn):
        return lambda *args, **kwargs: calls.append(name) or fn(*args, **kwargs)

    monkeypatch.setattr(dc, "deform_conv2d_torch", recorded("torch", deform_conv2d_torch))
    monkeypatch.setattr(dc, "deform_conv2d", recorded("torchvision", deform_conv2d))
    model["a"](x, offset, mask)
    assert calls == ["torch"]  # "auto" on CPU
    assert set_deform_impl(model, "torchvision") == 2
    assert model["a"].impl == model["c"].impl == "torchvision" and "impl='torchvision'" in repr(model["a"])
    torch.testing.assert_close(model["a"](x, offset, mask), reference, atol=1e-5, rtol=1e-5)
    assert calls == ["torch", "torchvision"]
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="impl must be one of"):
        set_deform_impl(model, "fast")
    with pytest.raises(ValueError, match="impl must be one of"):
        ModulatedDeformConv2d(3, 4, impl="fast")


def test_cpu_autocast_runs_in_bfloat16():
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(4, 4)
    x, offset, mask, _, _ = _case(torch.float32, size=(5, 6), channels=(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, offset, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x, offset, mask), atol=0.05, rtol=0.05)

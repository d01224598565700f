"""The PAC ops of upcli.kernels (pac_conv, pac_pool, pac_squared_distance, pac_tap_mask): registration (opcheck),
the unfold references in float64, gradients, and wrong sizes."""

import pytest
import torch
import torch.nn.functional as F

from upcli.kernels import pac_conv, pac_pool, pac_squared_distance, pac_tap_mask
from upcli.kernels.pac import (output_size, pac_conv_reference, pac_pool_reference,
                               pac_squared_distance_reference)

DD = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-10)

# (k, stride, padding, dilation, transposed, output_padding): awkward on purpose (anisotropic, a transposed padding
# larger than d * (k - 1) so the frame is cropped, stride 1 so pac_pool takes the fused path)
GEOMETRIES = [
    (3, (1, 1), (1, 1), (1, 1), False, (0, 0)),
    (3, (2, 1), (1, 0), (2, 1), False, (0, 0)),
    (5, (3, 2), (2, 1), (1, 1), False, (0, 0)),
    (3, (2, 2), (1, 1), (1, 1), True, (1, 1)),
    (3, (2, 3), (2, 1), (2, 1), True, (1, 0)),
    (3, (1, 1), (3, 1), (1, 1), True, (0, 0)),
    (5, (2, 2), (2, 2), (1, 1), True, (1, 1)),
]


def pac_inputs(geometry, B=2, C=3, H=5, W=4, seed=0):
    k, stride, padding, dilation, transposed, output_padding = geometry
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, **DD)
    Ho, Wo = output_size((H, W), k, stride, padding, dilation, transposed, output_padding)
    kernel = torch.rand(B, Ho, Wo, k, k, generator=g, **DD)
    weight = torch.randn(*((C, 2) if transposed else (2, C)), k, k, generator=g, **DD)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, transposed=transposed,
                  output_padding=output_padding)
    return x, kernel, weight, kwargs


def op_args(kwargs):
    return [list(kwargs["stride"]), list(kwargs["padding"]), list(kwargs["dilation"]), kwargs["transposed"],
            list(kwargs["output_padding"])]


GRAD_VARIANTS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
                 (False, False, False)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_opcheck_pac_conv(geometry):
    x, kernel, weight, kwargs = pac_inputs(geometry)
    for needs in GRAD_VARIANTS:
        args = [t.clone().requires_grad_(n) for t, n in zip((x, kernel, weight), needs)]
        torch.library.opcheck(torch.ops.upcli.pac_conv.default, (*args, *op_args(kwargs)))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_opcheck_pac_pool(geometry):
    x, kernel, _, kwargs = pac_inputs(geometry)
    for needs in GRAD_VARIANTS[:3] + GRAD_VARIANTS[4:]:
        args = [t.clone().requires_grad_(n) for t, n in zip((x, kernel), needs)]
        torch.library.opcheck(torch.ops.upcli.pac_pool.default, (*args, *op_args(kwargs)))


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, (1, 1), (1, 1), (1, 1)), (3, (2, 1), (1, 2), (1, 2)),
                                                       (5, (3, 2), (2, 0), (1, 1))])
def test_opcheck_pac_squared_distance(k, stride, padding, dilation):
    g = torch.Generator().manual_seed(3)
    guidance = torch.randn(2, 3, 7, 6, generator=g, **DD)
    centre = torch.randn(2, 3, 7, 6, generator=g, **DD)
    op = torch.ops.upcli.pac_squared_distance.default
    for asym in (False, True):
        for needs in [(True, True), (True, False), (False, True), (False, False)]:
            args = (guidance.clone().requires_grad_(needs[0]), centre.clone().requires_grad_(needs[1]))
            torch.library.opcheck(op, (*args, k, list(stride), list(padding), list(dilation), asym))
        for needs in (True, False):
            torch.library.opcheck(op, (guidance.clone().requires_grad_(needs), None, k, list(stride), list(padding),
                                       list(dilation), asym))


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[4]])  # fused pool / per-tap transposed
def test_opcheck_backward_ops(geometry):
    """The backward ops on their own (no autograd of their own: no double backward), every output mask."""
    x, kernel, weight, kwargs = pac_inputs(geometry)
    grad = torch.randn(x.shape[0], 2, *kernel.shape[1:3], **DD)
    for mask in [[True, True, True], [True, False, False], [False, True, False], [False, False, True]]:
        torch.library.opcheck(torch.ops.upcli.pac_conv_backward.default,
                              (grad, x, kernel, weight, *op_args(kwargs), mask))
    grad = torch.randn(x.shape[0], 3, *kernel.shape[1:3], **DD)
    for mask in [[True, True], [True, False], [False, True]]:
        torch.library.opcheck(torch.ops.upcli.pac_pool_backward.default, (grad, x, kernel, *op_args(kwargs), mask))


def test_opcheck_squared_distance_backward():
    guidance = torch.randn(2, 3, 5, 4, **DD)
    D = torch.randn(2, 3, 2, 3, 3, **DD)  # k 3, stride 2, padding 1 on 5 x 4
    for centre, masks in [(None, [[True, False]]), (torch.randn_like(guidance), [[True, True], [False, True]])]:
        for mask in masks:
            torch.library.opcheck(torch.ops.upcli.pac_squared_distance_backward.default,
                                  (D, guidance, centre, 3, [2, 2], [1, 1], [1, 1], True, mask))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_pac_conv_and_pool_match_unfold_forward_and_grads(geometry):
    x, kernel, weight, kwargs = pac_inputs(geometry, seed=1)
    bias = torch.randn(2, **DD)
    for ours_fn, ref_fn, tensors in [(pac_conv, pac_conv_reference, (x, kernel, weight, bias)),
                                     (pac_pool, pac_pool_reference, (x, kernel))]:
        args = [t.clone().requires_grad_() for t in tensors]
        ref_args = [t.clone().requires_grad_() for t in tensors]
        ours, expected = ours_fn(*args, **kwargs), ref_fn(*ref_args, **kwargs)
        torch.testing.assert_close(ours, expected, **TOL)
        grad = torch.randn_like(ours)
        ours.backward(grad)
        expected.backward(grad)
        for a, b in zip(args, ref_args):
            torch.testing.assert_close(a.grad, b.grad, **TOL)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_ones_kernel_is_torch_conv_and_pool_is_depthwise(geometry):
    x, kernel, weight, kwargs = pac_inputs(geometry, seed=2)
    ones = torch.ones_like(kernel)
    transposed, output_padding = kwargs.pop("transposed"), kwargs.pop("output_padding")
    if transposed:
        plain = F.conv_transpose2d(x, weight, output_padding=output_padding, **kwargs)
        depthwise = F.conv_transpose2d(x, weight[:1, :1].expand(3, 1, -1, -1), output_padding=output_padding,
                                       groups=3, **kwargs)
    else:
        plain = F.conv2d(x, weight, **kwargs)
        depthwise = F.conv2d(x, weight[:1, :1].expand(3, 1, -1, -1), groups=3, **kwargs)
    kwargs.update(transposed=transposed, output_padding=output_padding)
    torch.testing.assert_close(pac_conv(x, ones, weight, **kwargs), plain, **TOL)
    shared = weight[0, 0].flip(-1, -2) if transposed else weight[0, 0]  # pac_pool correlates in the padded frame
    torch.testing.assert_close(pac_pool(x, ones * shared, **kwargs), depthwise, **TOL)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, (2, 1), (1, 2), (1, 2)), (5, 3, 2, 1)])
def test_pac_squared_distance_matches_unfold(asym, k, stride, padding, dilation):
    g = torch.Generator().manual_seed(4)
    guidance = torch.randn(2, 3, 7, 6, generator=g, **DD)
    centre = torch.randn(2, 3, 7, 6, generator=g, **DD)
    for c in (None, centre):
        ours_in = [t.clone().requires_grad_() for t in (guidance, c) if t is not None]
        ref_in = [t.clone().requires_grad_() for t in (guidance, c) if t is not None]
        kw = dict(stride=stride, padding=padding, dilation=dilation, asym=asym)
        ours = pac_squared_distance(ours_in[0], k, centre=ours_in[1] if c is not None else None, **kw)
        expected = pac_squared_distance_reference(ref_in[0], k, centre=ref_in[1] if c is not None else None, **kw)
        torch.testing.assert_close(ours, expected, **TOL)
        grad = torch.randn_like(ours)
        ours.backward(grad)
        expected.backward(grad)
        for a, b in zip(ours_in, ref_in):
            torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_gradcheck():
    x, kernel, weight, kwargs = pac_inputs(GEOMETRIES[4], B=1, C=2, H=3, W=3)
    x, kernel, weight = (t.requires_grad_() for t in (x, kernel, weight))
    assert torch.autograd.gradcheck(lambda *t: pac_conv(*t, **kwargs), (x, kernel, weight), fast_mode=True)
    for geometry in (GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[4]):  # fused, per-tap, transposed per-tap
        x, kernel, _, kwargs = pac_inputs(geometry, B=1, C=2, H=3, W=3)
        assert torch.autograd.gradcheck(lambda *t: pac_pool(*t, **kwargs), (x.requires_grad_(),
                                                                               kernel.requires_grad_()),
                                        fast_mode=True)
    guidance, centre = torch.randn(1, 2, 4, 5, **DD, requires_grad=True), torch.randn(1, 2, 4, 5, **DD,
                                                                                       requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, c: pac_squared_distance(g, 3, 2, 1, centre=c), (guidance, centre),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda g: pac_squared_distance(g, 3, 1, 2, 2, asym=True), (guidance,),
                                    fast_mode=True)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tap_mask_marks_the_taps_on_real_input(geometry):
    k, stride, padding, dilation, transposed, output_padding = geometry
    mask = pac_tap_mask((5, 4), k, stride, padding, dilation, transposed, output_padding, **DD)
    # the taps a ones input reaches, through the reference's own zero insertion and padding
    cols = pac_pool_reference(torch.ones(1, 1, 5, 4, **DD), torch.eye(k * k, **DD).view(k * k, 1, 1, k, k)
                              .expand(k * k, *mask.shape[:2], k, k), stride, padding, dilation, transposed,
                              output_padding)
    torch.testing.assert_close(mask, cols[:, 0].permute(1, 2, 0).reshape(mask.shape), rtol=0, atol=0)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_batch_zero_and_channels_last():
    x, kernel, weight, kwargs = pac_inputs(GEOMETRIES[3])
    assert pac_conv(x[:0], kernel[:0], weight, **kwargs).shape == (0, 2, *kernel.shape[1:3])
    assert pac_pool(x[:0], kernel[:0], **kwargs).shape == (0, 3, *kernel.shape[1:3])
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(pac_conv(x_cl, kernel, weight, **kwargs), pac_conv_reference(x, kernel, weight,
                                                                                             **kwargs), **TOL)
    torch.testing.assert_close(pac_pool(x_cl, kernel, **kwargs), pac_pool_reference(x, kernel, **kwargs), **TOL)


def test_double_backward_raises():
    x, kernel, weight, kwargs = pac_inputs(GEOMETRIES[1])
    x.requires_grad_()
    for out in (pac_conv(x, kernel, weight, **kwargs), pac_pool(x, kernel, **kwargs),
                pac_squared_distance(x, 3, padding=1)):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(out.sum(), x, create_graph=True)


def test_wrong_sizes_raise():
    x, kernel, weight, kwargs = pac_inputs(GEOMETRIES[1])
    with pytest.raises(ValueError, match="must be \\(B, H_out, W_out, k, k\\)"):
        pac_conv(x, kernel[:, :-1], weight, **kwargs)
    with pytest.raises(ValueError, match="does not fit"):
        pac_conv(x[:, :2], kernel, weight, **kwargs)
    with pytest.raises(ValueError, match="square k x k"):
        pac_conv(x, kernel, weight[..., :2], **kwargs)
    with pytest.raises(ValueError, match="must be \\(B, H_out, W_out, k, k\\)"):
        pac_pool(x, kernel[:1], **kwargs)
    with pytest.raises(ValueError, match="odd"):
        pac_squared_distance(x, 4)
    with pytest.raises(ValueError, match="same shape"):
        pac_squared_distance(x, 3, centre=x[:, :1])

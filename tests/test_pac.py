"""PAC layers: torch equivalence at K == 1, kernel formulas, gradients, hot-swapping, memory."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upcli.kernels.pac import pac_conv_reference
from upcli.pac import PacConv2d, PacConvTranspose2d, PacPool2d, hot_swap, parse_kernel_type


def constant_guidance(x: torch.Tensor, size=None, channels: int = 3) -> torch.Tensor:
    """Zero guidance: equal to the zero padding too, so K == 1 at every tap for the gaussian kernel (a window
    whose centre lies in the padding, as with stride 3 and padding 2 at k = 3, compares against the pad value)."""
    return torch.zeros((x.shape[0], channels, *(size or x.shape[-2:])), dtype=x.dtype)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (1, 1, 1), (2, 1, 1), (1, 2, 2), (3, 2, 1), (2, 3, 2)])
def test_pac_conv2d_equals_conv2d_when_k_is_one(stride, padding, dilation):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 11, 13)
    pac = PacConv2d(4, 5, 3, stride=stride, padding=padding, dilation=dilation)
    conv = nn.Conv2d(4, 5, 3, stride=stride, padding=padding, dilation=dilation)
    conv.load_state_dict(pac.state_dict())
    torch.testing.assert_close(pac(x, constant_guidance(x)), conv(x), rtol=1e-5, atol=1e-5)


def test_shared_filters_apply_one_filter_to_every_channel():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 10, 12)
    for stride in (1, 2):
        pac = PacConv2d(6, 6, 5, stride=stride, padding=2, shared_filters=True)
        depthwise = F.conv2d(x, pac.weight.expand(6, 1, 5, 5), pac.bias, stride=stride, padding=2, groups=6)
        torch.testing.assert_close(pac(x, constant_guidance(x)), depthwise, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,output_padding,dilation",
                         [(2, 1, 1, 1), (2, 2, 1, 1), (3, 0, 0, 1), (2, 2, 1, 2), (1, 2, 0, 1)])
def test_pac_conv_transpose2d_equals_conv_transpose2d_when_k_is_one(stride, padding, output_padding, dilation):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 9)
    pac = PacConvTranspose2d(4, 5, 5, stride=stride, padding=padding, output_padding=output_padding,
                             dilation=dilation)
    conv = nn.ConvTranspose2d(4, 5, 5, stride=stride, padding=padding, output_padding=output_padding,
                              dilation=dilation)
    conv.load_state_dict(pac.state_dict())
    ref = conv(x)
    torch.testing.assert_close(pac(x, constant_guidance(x, ref.shape[-2:])), ref, rtol=1e-5, atol=1e-5)
    shared = PacConvTranspose2d(4, 4, 5, stride=stride, padding=padding, output_padding=output_padding,
                                dilation=dilation, shared_filters=True)
    depthwise = F.conv_transpose2d(x, shared.weight.expand(4, 1, 5, 5), shared.bias, stride, padding,
                                   output_padding, groups=4, dilation=dilation)
    torch.testing.assert_close(shared(x, constant_guidance(x, depthwise.shape[-2:])), depthwise, rtol=1e-5,
                               atol=1e-5)


def pac_transposed_reference(x, g, weight, bias, stride, padding, output_padding, dilation, normalize):
    """PAC's transposed layer with the Gaussian kernel, by loops over the real input samples (float64).

    Input sample n reaches output pixel p = n * s - padding + m * d through filter tap m (torch's ConvTranspose2d
    convention for W, which upcli keeps; PAC's release does not flip W). The adapting kernel compares the guidance
    at p with the guidance at n's place on the output grid, q = p + (k // 2 - m) * d (zero outside it). With
    ``normalize``, each output pixel is divided by Z[p], the sum of K over the (n, m) pairs that reach it: real
    samples only, neither the inserted zeros nor the padding (PAC's ``nd2col(..., transposed=True)`` mask).
    """
    B, C, H, W = x.shape
    k = weight.shape[-1]
    Ho, Wo = g.shape[-2:]
    num = torch.zeros(B, weight.shape[1], Ho, Wo, dtype=torch.float64)
    Z = torch.zeros(B, Ho, Wo, dtype=torch.float64)
    for a in range(H):
        for b in range(W):
            for mi in range(k):
                for mj in range(k):
                    p = (a * stride[0] - padding[0] + mi * dilation[0], b * stride[1] - padding[1] + mj * dilation[1])
                    if not (0 <= p[0] < Ho and 0 <= p[1] < Wo):
                        continue
                    q = (p[0] + (k // 2 - mi) * dilation[0], p[1] + (k // 2 - mj) * dilation[1])
                    gq = g[:, :, q[0], q[1]] if 0 <= q[0] < Ho and 0 <= q[1] < Wo else torch.zeros_like(g[:, :, 0, 0])
                    K = torch.exp(-0.5 * ((gq - g[:, :, p[0], p[1]]) ** 2).sum(1))
                    num[:, :, p[0], p[1]] += K[:, None] * (x[:, :, a, b] @ weight[:, :, mi, mj])
                    Z[:, p[0], p[1]] += K
    out = num / torch.where(Z > 0, Z, 1.0)[:, None] if normalize else num
    return out if bias is None else out + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("kernel_size,stride,padding,output_padding,dilation",
                         [(5, 2, 2, 1, 1), (3, 2, 1, 1, 1), (3, 3, 0, 2, 1), (5, 2, 3, 1, 1), (3, 2, 2, 1, 2),
                          (5, 1, 1, 0, 1), (3, (2, 3), (1, 0), (0, 2), (1, 2))])
@pytest.mark.parametrize("shared_filters", [False, True])
def test_pac_conv_transpose2d_matches_pac_formula_and_its_normalisation(kernel_size, stride, padding, output_padding,
                                                                         dilation, shared_filters):
    torch.manual_seed(0)
    C = 3
    x = torch.randn(2, C, 4, 5, dtype=torch.float64)
    for normalize in (False, True):
        layer = PacConvTranspose2d(C, C, kernel_size, stride=stride, padding=padding, output_padding=output_padding,
                                   dilation=dilation, normalize_kernel=normalize, shared_filters=shared_filters,
                                   dtype=torch.float64)
        with torch.no_grad():
            layer.bias.normal_()
        g = torch.randn(2, 2, *layer.output_size(*x.shape[-2:]), dtype=torch.float64)
        weight = torch.eye(C, dtype=torch.float64)[:, :, None, None] * layer.weight if shared_filters else layer.weight
        expected = pac_transposed_reference(x, g, weight, layer.bias, layer.stride, layer.padding,
                                            layer.output_padding, layer.dilation, normalize)
        torch.testing.assert_close(layer(x, g), expected, rtol=1e-10, atol=1e-10)


def test_normalised_pac_conv_transpose2d_averages_real_samples_only():
    """The reproduction of the normalisation bug: K == 1 and W == 1 average the real samples, so ones stay ones
    (normalising over the inserted zeros too gave 0.36, 0.24 and 0.16 here)."""
    x, g = torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 16, 16)
    layer = PacConvTranspose2d(1, 1, 5, stride=2, padding=2, output_padding=1, normalize_kernel=True, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    torch.testing.assert_close(layer(x, g), torch.ones(1, 1, 16, 16))
    up = PacConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1, normalize_kernel=True, smooth_kernel="full_3",
                            dtype=torch.float64)
    x, g = torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.randn(1, 2, 6, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, g, *ps: up(x, g), (x.requires_grad_(), g.requires_grad_(),
                                                                 *up.parameters()), fast_mode=True)


@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 2, 1), (3, 1, 1), (5, 2, 2), (3, 3, 0)])
def test_normalised_pac_pool_equals_avg_pool_when_k_is_one(kernel_size, stride, padding):
    x = torch.randn(2, 3, 10, 13)
    pool = PacPool2d(kernel_size, stride, padding, normalize_kernel=True)
    ref = nn.AvgPool2d(kernel_size, stride, padding, count_include_pad=False)(x)
    torch.testing.assert_close(pool(x, constant_guidance(x)), ref, rtol=1e-5, atol=1e-6)
    # without normalisation it is the window sum (PAC's PacPool2d), counting padded zeros as zeros
    summed = PacPool2d(kernel_size, stride, padding)(x, constant_guidance(x))
    torch.testing.assert_close(summed, F.avg_pool2d(x, kernel_size, stride, padding) * kernel_size**2, rtol=1e-5,
                               atol=1e-5)


def test_device_dtype_and_reset_parameters():
    makers = [lambda **kw: PacConv2d(3, 4, 3, kernel_type="inv_0.5_-1", smooth_kernel="full_3", kernel_gain=0.5, **kw),
              lambda **kw: PacConvTranspose2d(3, 3, 5, stride=2, shared_filters=True, **kw),
              lambda **kw: PacPool2d(3, kernel_type="inv_0.5_-1", smooth_kernel="full_3", **kw)]
    for make in makers:
        state = make(dtype=torch.float64).state_dict()
        assert state and all(t.dtype == torch.float64 for t in state.values())
        assert all(t.is_meta for t in make(device="meta").state_dict().values())
        torch.manual_seed(0)
        layer = make()
        initial = {k: v.clone() for k, v in layer.state_dict().items()}
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(1.0)
        torch.manual_seed(0)
        layer.reset_parameters()
        for key, value in layer.state_dict().items():
            assert torch.equal(value, initial[key]), key
    # the filter is drawn as torch's layer draws its own
    for ours, theirs in [(PacConv2d, nn.Conv2d), (PacConvTranspose2d, nn.ConvTranspose2d)]:
        torch.manual_seed(1)
        a = ours(3, 5, 3)
        torch.manual_seed(1)
        b = theirs(3, 5, 3)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


# ---- kernel formulas on a hand-computed 3x3 example -----------------------------------------------------------
GUIDE = torch.tensor([[0.0, 1.0, 2.0], [1.0, 2.0, 0.5], [3.0, 0.0, 1.0]])  # one channel; centre value 2.0


def kernel_at_centre(layer) -> torch.Tensor:
    f = GUIDE.view(1, 1, 3, 3)
    return layer.compute_kernel(f, (3, 3), (1, 1), (1, 1), (1, 1))[0, 1, 1]  # (3, 3) taps around pixel (1, 1)


def test_gaussian_kernel_formula():
    K = kernel_at_centre(PacPool2d(3, 1, 1))
    expected = torch.exp(-0.5 * (GUIDE - 2.0) ** 2)  # e.g. tap (0, 0): exp(-0.5 * 4) = 0.1353
    torch.testing.assert_close(K, expected)
    assert K[0, 0].item() == pytest.approx(math.exp(-2.0))


def test_inverse_kernel_formulas():
    assert parse_kernel_type("inv_0.5_-1_asym_fixed") == {"kind": "inv", "alpha": 0.5, "lam": -1.0, "asym": True,
                                                          "fixed": True}
    K = kernel_at_centre(PacPool2d(3, 1, 1, kernel_type="inv_0.5_-1"))
    # tap (0, 0): 0.5 + (4 + 1e-4) ** -0.5 = 0.99999; the centre: 0.5 + (1e-4) ** -0.5 = 100.5
    assert K[0, 0].item() == pytest.approx(0.5 + (4 + 1e-4) ** -0.5)
    assert K[1, 1].item() == pytest.approx(100.5)
    torch.testing.assert_close(K, 0.5 + ((GUIDE - 2.0) ** 2 + 1e-4) ** -0.5)
    asym = kernel_at_centre(PacPool2d(3, 1, 1, kernel_type="inv_0.5_-1_asym"))
    # only neighbours above the centre count: tap (2, 0) holds 3.0 -> 0.5 + 1.0001 ** -0.5; all others see d = 0
    torch.testing.assert_close(asym, 0.5 + (F.relu(GUIDE - 2.0) ** 2 + 1e-4) ** -0.5)
    assert asym[2, 0].item() == pytest.approx(0.5 + (1 + 1e-4) ** -0.5) and asym[0, 0].item() == pytest.approx(100.5)
    learned = PacPool2d(3, kernel_type="inv_0.5_-1")
    fixed = PacPool2d(3, kernel_type="inv_0.5_-1_fixed")
    assert {n for n, _ in learned.named_parameters()} == {"inv_alpha", "inv_lambda"}
    assert not list(fixed.parameters())
    with pytest.raises(ValueError, match="kernel_type"):
        PacPool2d(3, kernel_type="laplace")


def test_smoothed_centre_and_normalisation():
    smooth = kernel_at_centre(PacPool2d(3, 1, 1, smooth_kernel="gaussian"))
    g = torch.tensor([0.25, 0.5, 0.25])
    centre = (g[:, None] * g[None, :] * GUIDE).sum()  # corners 6 / 16 + edges 2.5 / 8 + centre 2 / 4 = 1.1875
    assert centre.item() == pytest.approx(1.1875)
    torch.testing.assert_close(smooth, torch.exp(-0.5 * (GUIDE - centre) ** 2))
    box = kernel_at_centre(PacPool2d(3, 1, 1, smooth_kernel="average_3"))
    torch.testing.assert_close(box, torch.exp(-0.5 * (GUIDE - GUIDE.mean()) ** 2))
    assert [n for n, _ in PacPool2d(3, smooth_kernel="full_3").named_parameters()] == ["smooth"]
    # normalised at a corner: only the 4 taps inside the image count, and they sum to one
    f = GUIDE.view(1, 1, 3, 3)
    K = PacPool2d(3, 1, 1, normalize_kernel=True).compute_kernel(f, (3, 3), (1, 1), (1, 1), (1, 1))[0, 0, 0]
    raw = torch.exp(-0.5 * (GUIDE[:2, :2] - 0.0) ** 2)
    torch.testing.assert_close(K[1:, 1:], raw / raw.sum())
    assert K[0].abs().sum() == 0 and K[:, 0].abs().sum() == 0


# ---- gradients -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_type", ["gaussian", "inv_0.5_-1_asym"])
def test_gradcheck_input_weights_and_guidance(kernel_type):
    torch.manual_seed(0)
    dd = dict(dtype=torch.float64)
    x = torch.randn(1, 2, 5, 6, **dd, requires_grad=True)
    f = torch.randn(1, 2, 5, 6, **dd, requires_grad=True)
    layers = [
        PacConv2d(2, 3, 3, stride=2, padding=1, kernel_type=kernel_type, smooth_kernel="gaussian"),
        PacConv2d(2, 2, 3, padding=1, kernel_type=kernel_type, shared_filters=True, normalize_kernel=True),
        PacPool2d(3, 1, 1, kernel_type=kernel_type, smooth_kernel="full_3"),
    ]
    for layer in layers:
        layer.double()
        params = [p for p in layer.parameters()]
        assert torch.autograd.gradcheck(lambda x, f, *ps: layer(x, f), (x, f, *params)), layer
    up = PacConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, kernel_type=kernel_type).double()
    g = torch.randn(1, 2, 10, 12, **dd, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, *ps: up(x, g), (x, g, *up.parameters()))
    shared_up = PacConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1, shared_filters=True).double()
    assert torch.autograd.gradcheck(lambda x, g, *ps: shared_up(x, g), (x, g, *shared_up.parameters()))


def test_a_guidance_branch_learns_through_the_kernel():
    branch = nn.Conv2d(3, 4, 1)
    layer = PacConv2d(2, 2, 3, padding=1, guidance_branch=branch)
    x, image = torch.randn(1, 2, 8, 8), torch.rand(1, 3, 8, 8)
    layer(x, image).square().sum().backward()
    assert branch.weight.grad is not None and branch.weight.grad.abs().sum() > 0


# ---- hot-swapping ---------------------------------------------------------------------------------------------
def test_hot_swap_keeps_a_resnet_block_unchanged_at_initialisation():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    x = torch.randn(2, 64, 16, 16)
    for block in (BasicBlock(64, 64), Bottleneck(64, 16)):
        block.eval()
        with torch.no_grad():
            for m in block.modules():  # non-trivial batch-norm statistics
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2)
        before = block(x)
        names = ["conv1", "conv2"]
        state = {k: v.clone() for k, v in block.state_dict().items()}
        assert hot_swap(block, names, guidance="input") == names
        assert all(isinstance(getattr(block, n), PacConv2d) for n in names)
        torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-5)
        # the pretrained weights are where they were, under the same names
        for key, value in state.items():
            assert torch.equal(block.state_dict()[key], value), key
        # and the swapped layers can learn to adapt: the gain gets a gradient at 0
        block(x).square().mean().backward()
        assert block.conv2.kernel_gain.grad.abs() > 0
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    image = torch.randn(1, 3, 12, 12)
    before = net(image)
    hot_swap(net, ["2"], guidance="0")  # guided by the first layer's output, resized to the layer's input
    torch.testing.assert_close(net(image), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not an nn.Conv2d"):
        hot_swap(net, ["1"])


# ---- memory ---------------------------------------------------------------------------------------------------
def _peak(fn) -> int:
    from upcli.kernels.bench import PeakMemory

    with PeakMemory(torch.device("cpu")) as peak:
        fn()
    return peak.peak


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
def test_peak_memory_below_the_unfold_form():
    torch.manual_seed(0)
    C, k, size = 64, 5, 256
    x = torch.randn(1, C, size, size, requires_grad=True)
    f = torch.randn(1, 8, size, size, requires_grad=True)
    layer = PacConv2d(C, C, k, padding=k // 2)

    def ours():
        layer(x, f).sum().backward()

    def unfold():  # PAC's native form: the input unfolded, C * k * k * H * W floats
        K = layer.compute_kernel(f, (size, size), (1, 1), (2, 2), (1, 1))
        pac_conv_reference(x, K, layer.weight, layer.bias, padding=2).sum().backward()

    try:
        ours()
        theirs = _peak(unfold)
        mine = _peak(ours)
    except PermissionError:
        pytest.skip("/proc/self/clear_refs is not writable here")
    cols = C * k * k * size * size * 4
    assert theirs > cols  # the unfolded input alone: 420 MB
    assert mine < theirs / 4, (mine / 2**20, theirs / 2**20)


# ---- the PAC upsampler ----------------------------------------------------------------------------------------
def test_untrained_pac_upsampler_is_repeated_bilinear_2x_and_learns_to_adapt():
    from upcli.upsamplers import create_upsampler

    torch.manual_seed(0)
    up = create_upsampler("pac", dim=6, layers=3, pretrained=False)
    x, image = torch.randn(2, 6, 5, 7), torch.rand(2, 3, 40, 56)
    expected = x
    for _ in range(3):
        expected = F.interpolate(expected, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x, image, (40, 56)), expected, rtol=1e-5, atol=1e-5)
    assert up(x, image, (33, 50)).shape == (2, 6, 33, 50)  # any size: the stages, then a resize
    up(x, image, (40, 56)).square().mean().backward()
    assert all(stage.up.kernel_gain.grad.abs() > 0 for stage in up.stages)
    assert up.stages[0].up.weight.grad.abs().sum() > 0


def test_train_pac_writes_a_checkpoint_that_upsample_uses(cli, tmp_path):
    from upcli.io import FeatureStore

    examples = Path(__file__).resolve().parents[1] / "examples" / "images"
    ckpt = tmp_path / "pac.safetensors"
    run = cli("train", examples, "--upsampler", "pac", "--out", ckpt, "--steps", "2", "--batch-size", "1",
              "--image-size", "64", "--views", "1", "--device", "cpu", "-q")
    assert run.returncode == 0, run.stderr
    out = tmp_path / "feats"
    up = cli("upsample", examples, "--upsampler", ckpt, "--out", out, "--size", "96", "--workers", "0", "-q")
    assert up.returncode == 0, up.stderr
    store = FeatureStore(out)
    assert len(store) == 4 and all(store[s].shape[0] == 320 and min(store[s].shape[1:]) == 96 for s in store)
    assert store.attrs("chelsea.png")["upsampler"] == "pac"

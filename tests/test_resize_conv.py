"""The resize-convolution's fast computations (models.ResizeConv2d): tap products at the deep
levels and the folded transposed convolution above equal "nearest 2x, then a 3x3 convolution"
forward and backward, keep the checkpoint format, and cost less than the paper's network."""

import pytest
import torch
from torch import nn

from conftest import tiny_model
from models import ModelConfig, ResizeConv2d, build_generator


def resize_conv_outputs(module, x, grad, computation):
    """(output, input grad, weight grad, bias grad) of `module` computed one way."""
    module.computation = computation
    x = x.detach().requires_grad_()
    y = module(x)
    return (y, *torch.autograd.grad(y, (x, module.conv.weight, module.conv.bias), grad))


@pytest.mark.parametrize("computation", ["taps", "transposed"])
@pytest.mark.parametrize("shape", [(2, 5, 1, 1), (1, 4, 3, 5), (3, 6, 7, 4), (2, 8, 8, 8),
                                   (1, 3, 12, 20)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_resize_conv_is_upsample_then_conv(computation, shape, dtype, tolerance,
                                                channels_last):
    """The tap products and the transposed convolution with the folded 4x4 kernel compute
    nearest 2x + 3x3 conv, forward and backward, at odd, non-square and 1x1 sizes (the
    U-Net's bottleneck), in either memory format."""
    torch.manual_seed(0)
    module = ResizeConv2d(shape[1], 7, bias=True).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(shape[0], 7, 2 * shape[2], 2 * shape[3], dtype=dtype)
    fast = resize_conv_outputs(module, x, grad, computation)
    plain = resize_conv_outputs(module, x, grad, "plain")
    assert fast[0].shape == (shape[0], 7, 2 * shape[2], 2 * shape[3])
    for a, b in zip(fast, plain):  # output, d/dx, d/dweight (the 3x3 kernel), d/dbias
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= tolerance * max(scale, 1)


def test_tap_products_in_bf16_stay_within_bf16_rounding():
    """Under bf16 autocast the tap products round once more than a convolution would (the
    9 products, then their sums): still within a few bf16 steps of the fp32 result."""
    torch.manual_seed(0)
    module = ResizeConv2d(64, 32, bias=True)
    x = torch.randn(2, 64, 4, 6)
    with torch.no_grad():
        module.computation = "plain"
        reference = module(x)
        module.computation = "taps"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = module(x)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - reference).abs().max() <= 0.03 * reference.abs().max()


def test_fast_generator_gives_the_plain_generators_photos_and_gradients():
    """A whole default generator, trained-looking weights (random batch-norm statistics too),
    in eval and train mode at a non-square size: as it runs by default (tap products at the
    deep levels, transposed convolutions above) it equals the plain computation to fp32
    rounding."""
    torch.manual_seed(0)
    generator = build_generator(tiny_model(upsample="resize", dropout=False))
    with torch.no_grad():
        for m in generator.modules():
            if isinstance(m, nn.Conv2d):  # activations of order 1: no saturated tanh
                m.weight.normal_(0, m.weight[0].numel() ** -0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[-2] * args[0].shape[-1])
        if isinstance(m, ResizeConv2d) else None)

    def run(computation, train_mode):
        ResizeConv2d.computation = computation
        generator.train(train_mode)
        generator.zero_grad()
        photo = generator(x)
        photo.square().mean().backward()
        return photo.detach(), [p.grad.clone() for p in generator.parameters()]

    try:
        for train_mode in (False, True):
            fast, fast_grads = run("auto", train_mode)
            plain, plain_grads = run("plain", train_mode)
            assert fast.std() > 0.05  # photos with content, not a constant
            assert (fast - plain).abs().max() < 1e-5
            for a, b in zip(fast_grads, plain_grads):
                assert (a - b).abs().max() <= 1e-4 * max(b.abs().max().item(), 1e-3)
    finally:
        ResizeConv2d.computation = "auto"
        hook.remove()
    areas = set(seen)  # both fast computations ran: inputs up to 16x16 and above
    assert min(areas) <= ResizeConv2d.max_tap_area < max(areas)


def test_resize_generator_keeps_its_checkpoint_format():
    """State-dict keys and shapes as before the fast computations: old checkpoints load, and
    the parameters are still the 3x3 kernels."""
    generator = build_generator(tiny_model(image_size=256, upsample="resize"))
    shapes = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    assert shapes["decoder.up1.conv.conv.weight"] == (3, 16, 3, 3)
    assert shapes["decoder.up8.conv.conv.weight"] == (64, 64, 3, 3)
    assert not any("resize" in key for key in shapes)


def generator_forward_gflop(**options):
    """GFLOP of a generator's forward at 256x256, as inference runs it (no gradients; the
    first call prepares the resize-convolutions' kernels, later ones reuse them)."""
    from torch.utils.flop_counter import FlopCounterMode
    generator = build_generator(ModelConfig(**options)).eval()
    with torch.no_grad():
        generator(torch.zeros(1, 3, 256, 256))
        with FlopCounterMode(display=False) as counter:
            generator(torch.zeros(1, 3, 256, 256))
    return counter.get_total_flops() / 1e9


def test_default_generator_costs_less_than_the_papers():
    """At 256x256 the resize-convolution generator's forward costs less than the paper's
    transposed convolutions (12.1 GFLOP): 9 tap products per input pixel at the deep levels,
    the folded transposed convolution (16) above; computed plainly it would cost 22.2."""
    paper = generator_forward_gflop(upsample="transposed")
    default = generator_forward_gflop(upsample="resize")
    assert 12.0 < paper < 12.2
    assert 11.3 < default < 11.7  # 11.49
    try:
        ResizeConv2d.computation = "transposed"
        assert 12.0 < generator_forward_gflop(upsample="resize") < 12.3
        ResizeConv2d.computation = "plain"
        assert generator_forward_gflop(upsample="resize") > 22
    finally:
        ResizeConv2d.computation = "auto"


@pytest.mark.parametrize("computation", ["taps", "transposed"])
def test_kept_kernels_follow_weight_changes(computation):
    """Without gradients the prepared kernel is reused, but never after the weight changed (an
    optimiser step, a checkpoint loaded into the module)."""
    torch.manual_seed(0)
    module = ResizeConv2d(4, 5, bias=True)
    module.computation = computation
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        first = module(x)
        assert module(x).equal(first)
        module.conv.weight.mul_(2)  # in place: the same storage, a new version
        doubled = module(x)
        module.load_state_dict({"conv.weight": torch.randn(5, 4, 3, 3),
                                "conv.bias": torch.zeros(5)})
        loaded = module(x)
    module.computation = "plain"
    with torch.no_grad():
        assert (loaded - module(x)).abs().max() < 1e-5
    assert not torch.allclose(doubled, first) and not torch.allclose(loaded, doubled)

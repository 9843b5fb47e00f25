"""--padding: what the generator's convolutions take beyond the image's border (models.py):
zeros (the paper), the edge pixels repeated at the shallow levels (the default), or at all."""

import pytest
import torch
import torch.nn.functional as F

from config import TrainConfig, apply_preset
from models import (ModelConfig, ResizeConv2d, TransposedConv2d, UNetGenerator,
                    build_generator, fold_batch_norm)

SIZES = [(1, 1), (2, 3), (5, 4), (8, 8), (16, 12)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_replicate_resize_conv_is_the_same_in_every_computation(size, channels_last):
    """Nearest 2x, then a 3x3 convolution over the upsampled input with its edge repeated:
    the folded transposed convolution and the tap products give it too, forward and backward."""
    torch.manual_seed(0)
    layer = ResizeConv2d(6, 4, True, padding_mode="replicate").double()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    if channels_last:
        layer, x = layer.to(memory_format=torch.channels_last), \
            x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    expected = F.conv2d(F.pad(up, (1, 1, 1, 1), mode="replicate"), layer.conv.weight,
                        layer.conv.bias)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (x, layer.conv.weight, layer.conv.bias), grad)
    for computation in ("plain", "taps", "transposed"):
        layer.computation = computation
        y = layer(x)
        torch.testing.assert_close(y, expected)
        got = torch.autograd.grad(y, (x, layer.conv.weight, layer.conv.bias), grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", SIZES)
def test_replicate_transposed_conv_sees_the_edge_pixels_beyond_the_border(size):
    torch.manual_seed(0)
    layer = TransposedConv2d(3, 4, True, padding_mode="replicate").double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    padded = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), layer.weight,
                                layer.bias, stride=2, padding=1)  # 2 outputs more each side
    torch.testing.assert_close(layer(x), padded[..., 2:-2, 2:-2])
    zeros = TransposedConv2d(3, 4, True).double()
    zeros.load_state_dict(layer.state_dict())
    torch.testing.assert_close(zeros(x), F.conv_transpose2d(x, layer.weight, layer.bias,
                                                            stride=2, padding=1))


def level_modes(generator):
    encoder = [block.conv.padding_mode for block in generator.encoder.values()]
    decoder = [getattr(block.conv, "conv", block.conv) for block in generator.decoder.values()]
    # (a transposed convolution's own padding_mode is always "zeros": TransposedConv2d pads)
    return encoder, ["replicate" if getattr(c, "replicate", False) else c.padding_mode
                     for c in decoder]


@pytest.mark.parametrize("upsample", ["resize", "transposed"])
def test_shallow_levels_repeat_the_edge_and_deep_ones_keep_zeros(upsample):
    """Depth 7 (128x128): encoder inputs 128..2, decoder inputs 1..64 (up7 first)."""
    encoder, decoder = level_modes(UNetGenerator(3, 3, 4, 7, upsample=upsample,
                                                 padding="shallow"))
    assert encoder == ["replicate"] * 4 + ["zeros"] * 3  # inputs 128, 64, 32, 16 | 8, 4, 2
    assert decoder == ["zeros"] * 4 + ["replicate"] * 3  # inputs 1, 2, 4, 8 | 16, 32, 64
    for padding, mode in (("zeros", "zeros"), ("replicate", "replicate")):
        encoder, decoder = level_modes(UNetGenerator(3, 3, 4, 7, upsample=upsample,
                                                     padding=padding))
        assert set(encoder) == set(decoder) == {mode}


def test_replicate_everywhere_draws_no_border_a_flat_map_stays_flat():
    """Zeros give every level a border to draw; repeated edges give none: a flat label map
    becomes a flat photo, to the edge. (Batch norm in eval mode, dropout off; the paper's
    transposed convolutions make a checkerboard of their own even so.)"""
    torch.manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.3)
    for padding, is_flat in (("replicate", True), ("zeros", False)):
        generator = UNetGenerator(3, 3, 8, 5, upsample="resize", padding=padding).eval()
        with torch.no_grad():
            photo = generator(flat)
        spread = (photo.amax((2, 3)) - photo.amin((2, 3))).max().item()
        assert (spread < 1e-5) == is_flat, (padding, spread)


@pytest.mark.parametrize("padding", ["shallow", "replicate"])
def test_generator_keeps_its_keys_and_folds_its_batch_norm(padding):
    torch.manual_seed(0)
    zeros = UNetGenerator(3, 3, 8, 5, upsample="resize")
    padded = UNetGenerator(3, 3, 8, 5, upsample="resize", padding=padding)
    assert zeros.state_dict().keys() == padded.state_dict().keys()
    padded.load_state_dict(zeros.state_dict())
    for m in padded.modules():  # trained-looking statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    padded.eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        y = padded(x)
        torch.testing.assert_close(fold_batch_norm(padded)(x), y, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(y, zeros.eval()(x), atol=1e-3)  # the option does something


def test_zeros_stay_the_default_and_the_others_are_one_flag_away():
    """Measured on real photos (docs/quality.md): shallow removes the frame, and costs KID."""
    assert ModelConfig().padding == "zeros"
    assert TrainConfig(padding="shallow").model_config().padding == "shallow"
    assert TrainConfig(**apply_preset({"preset": "paper"})).model_config().padding == "zeros"
    old = {k: v for k, v in ModelConfig().to_dict().items() if k != "padding"}
    assert ModelConfig.from_dict(old).padding == "zeros"
    shallow = build_generator(ModelConfig(image_size=32, padding="shallow"))
    assert shallow.encoder.down1.conv.padding_mode == "replicate"
    with pytest.raises(ValueError, match="padding"):
        ModelConfig(padding="reflect")


def test_repeating_the_edge_costs_a_few_thin_convolutions_not_a_padded_level():
    """At 256x256: zeros 11.49 GFLOP; shallow adds the edge rows and columns only (11.84; the
    paper's network: 12.10), not the border outputs a padded input would add (12.48)."""
    from test_resize_conv import generator_forward_gflop
    zeros = generator_forward_gflop(upsample="resize")
    shallow = generator_forward_gflop(upsample="resize", padding="shallow")
    assert 0.2 < shallow - zeros < 0.5

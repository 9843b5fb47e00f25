"""The networks: sizes, shapes, receptive fields, dropout, biases, init, names, skips."""

import pytest
import torch
from torch import nn

from conftest import tiny_model
from models import (ModelConfig, PatchDiscriminator, ResizeConv2d, UNetGenerator,
                    build_discriminator, build_generator, count_parameters, fold_batch_norm)
from utils import declared

PAPER = declared(ModelConfig, "paper")  # the paper's networks (the defaults differ since)


@pytest.fixture(scope="module")
def paper_generator():
    torch.manual_seed(0)
    return build_generator(ModelConfig(**PAPER))


@pytest.fixture(scope="module")
def paper_discriminator():
    torch.manual_seed(0)
    return build_discriminator(ModelConfig(**PAPER))


def small_generator(**options):
    torch.manual_seed(0)
    return build_generator(tiny_model(**options))


# --- Sizes and shapes -----------------------------------------------------------------------


def test_paper_parameter_counts(paper_generator, paper_discriminator):
    assert count_parameters(paper_generator) == 54_413_955
    assert count_parameters(paper_discriminator) == 2_768_705


def test_discriminator_gives_30x30_logits_at_256(paper_discriminator):
    paper_discriminator.eval()
    label, photo = torch.randn(2, 3, 256, 256), torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert paper_discriminator(label, photo).shape == (2, 1, 30, 30)


@pytest.mark.parametrize("image_size, depth", [(256, 8), (128, 7), (32, 5)])
def test_depth_follows_image_size(image_size, depth):
    generator = small_generator(image_size=image_size)
    assert ModelConfig(image_size=image_size).depth == depth
    assert list(generator.encoder) == [f"down{k}" for k in range(1, depth + 1)]
    assert list(generator.decoder) == [f"up{k}" for k in range(depth, 0, -1)]


def test_depth_7_generator_at_128():
    generator = small_generator(image_size=128)
    with torch.no_grad():
        out = generator(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, 3, 128, 128)


@pytest.mark.parametrize("bad", [{"image_size": 100}, {"image_size": 2}, {"norm": "group"},
                                 {"discriminator_layers": -1}])
def test_invalid_model_config_is_refused(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_unknown_norm_lists_the_valid_ones():
    with pytest.raises(ValueError, match="batch.*instance"):
        UNetGenerator(norm="layer")


# --- Receptive field ------------------------------------------------------------------------


def logit_support(discriminator, size, row, col):
    """Bounding box (top, left, height, width) of the input pixels whose change reaches logit
    (row, col), from the gradient of that one logit (eval mode: fixed BN statistics)."""
    discriminator.eval()
    label = torch.randn(1, 3, size, size, requires_grad=True)
    photo = torch.randn(1, 3, size, size, requires_grad=True)
    discriminator(label, photo)[0, 0, row, col].backward()
    reach = (label.grad.abs().sum(1) + photo.grad.abs().sum(1))[0] > 0
    rows, cols = reach.any(1).nonzero().flatten(), reach.any(0).nonzero().flatten()
    top, left = rows.min().item(), cols.min().item()
    return top, left, rows.max().item() - top + 1, cols.max().item() - left + 1


@pytest.mark.parametrize("num_layers, patch", [(3, 70), (1, 16), (0, 1)])
def test_patch_receptive_field(num_layers, patch):
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(base_channels=8, num_layers=num_layers)
    size = 128
    with torch.no_grad():
        grid = discriminator.eval()(torch.zeros(1, 3, size, size),
                            torch.zeros(1, 3, size, size)).shape[-1]
    top, left, height, width = logit_support(discriminator, size, grid // 2, grid // 2)
    # Away from the borders the patch is complete: exactly the documented size, no more.
    assert 0 < top and top + height < size and 0 < left and left + width < size
    assert (height, width) == (patch, patch)


def test_one_pixel_change_reaches_only_nearby_logits():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(base_channels=8, num_layers=3).eval()
    label, photo = torch.randn(1, 3, 160, 160), torch.randn(1, 3, 160, 160)
    changed_photo = photo.clone()
    changed_photo[0, :, 80, 80] += 5.0
    with torch.no_grad():
        before = discriminator(label, photo)[0, 0]
        after = discriminator(label, changed_photo)[0, 0]
    rows, cols = ((after - before).abs() > 0).nonzero(as_tuple=True)
    assert len(rows) > 0
    # Logits are 8 px apart and each sees 70 px, so at most ceil(70 / 8) = 9 per axis.
    assert rows.max() - rows.min() + 1 <= 9 and cols.max() - cols.min() + 1 <= 9
    assert (after - before).abs()[0, 0] == 0  # a far-away logit is untouched


def test_pixelgan_gives_one_logit_per_pixel():
    torch.manual_seed(0)
    discriminator = build_discriminator(tiny_model(discriminator_layers=0)).eval()
    with torch.no_grad():
        assert discriminator(torch.randn(2, 3, 20, 24),
                            torch.randn(2, 3, 20, 24)).shape == (2, 1, 20, 24)
    # The reference's 1x1 convs: 6->8 (bias), 8->16 and 16->1 (bias only with instance norm).
    assert count_parameters(discriminator) == (6 * 8 + 8) + 8 * 16 + 2 * 16 + 16
    instance = build_discriminator(tiny_model(discriminator_layers=0, norm="instance"))
    assert count_parameters(instance) == (6 * 8 + 8) + (8 * 16 + 16) + (16 + 1)


# --- Layers: dropout, biases, output range, norms -------------------------------------------


def dropout_blocks(generator):
    return {name.split(".")[1]: m.p for name, m in generator.named_modules()
            if isinstance(m, nn.Dropout)}


def test_paper_dropout_placement(paper_generator):
    assert dropout_blocks(paper_generator) == {"up5": 0.5, "up6": 0.5, "up7": 0.5}
    assert all(name.startswith("decoder.") for name, m in paper_generator.named_modules()
               if isinstance(m, nn.Dropout))


def test_dropout_placement_at_other_depths():
    assert dropout_blocks(small_generator(image_size=128)) == {"up5": 0.5, "up6": 0.5}
    assert dropout_blocks(small_generator(image_size=32)) == {}


def test_no_dropout_when_turned_off():
    generator = small_generator(image_size=256, dropout=False)
    assert not any(isinstance(m, nn.Dropout) for m in generator.modules())


def test_output_is_tanh_bounded():
    generator = small_generator()
    assert isinstance(list(generator.decoder["up1"].children())[-1], nn.Tanh)
    with torch.no_grad():
        out = generator.train()(100 * torch.randn(3, 3, 32, 32))
    assert out.abs().max() <= 1.0
    assert out.abs().max() > 0.5  # not trivially squashed to zero


def conv_biases(module):
    """{conv name: has bias, followed by a norm}: the convs of each nn.Sequential block."""
    result = {}
    for block_name, block in module.named_modules():
        children = list(block.named_children())
        for i, (name, child) in enumerate(children):
            if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
                followed_by_norm = i + 1 < len(children) and isinstance(
                    children[i + 1][1], (nn.BatchNorm2d, nn.InstanceNorm2d))
                result[f"{block_name}.{name}"] = (child.bias is not None, followed_by_norm)
    return result


def test_biases_with_batch_norm(paper_generator, paper_discriminator):
    for module in (paper_generator, paper_discriminator):
        for name, (has_bias, before_norm) in conv_biases(module).items():
            if before_norm:
                assert not has_bias, f"{name}: a bias before batch norm is wasted"
    assert paper_generator.decoder["up1"].conv.bias is not None  # the output conv
    assert paper_discriminator.layers.head.bias is not None
    assert paper_discriminator.layers.conv1.bias is not None  # no norm follows it
    # Like the reference, the outermost down conv has no bias either.
    assert paper_generator.encoder["down1"].conv.bias is None


def test_instance_norm_variant():
    generator = small_generator(norm="instance")
    discriminator = build_discriminator(tiny_model(norm="instance"))
    for module in (generator, discriminator):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
        norms = [m for m in module.modules() if isinstance(m, nn.InstanceNorm2d)]
        assert norms and all(not m.affine and not m.track_running_stats for m in norms)
        # Affine-free norms: every conv keeps its bias.
        assert all(has_bias for has_bias, _ in conv_biases(module).values())
    with torch.no_grad():
        assert generator.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_initial_weight_statistics(paper_generator):
    convs = torch.cat([m.weight.flatten() for m in paper_generator.modules()
                       if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(convs.mean().item()) < 1e-3
    assert convs.std().item() == pytest.approx(0.02, rel=0.02)
    norms = [m for m in paper_generator.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight.flatten() for m in norms])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.005)
    assert scales.std().item() == pytest.approx(0.02, rel=0.2)
    assert all((m.bias == 0).all() for m in norms)
    assert all((m.bias == 0).all() for m in paper_generator.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None)


def test_readable_state_dict_keys(paper_generator, paper_discriminator):
    keys = set(paper_generator.state_dict())
    for key in ("encoder.down1.conv.weight", "encoder.down3.conv.weight",
                "encoder.down3.norm.running_mean", "decoder.up8.conv.weight",
                "decoder.up1.conv.weight", "decoder.up1.conv.bias"):
        assert key in keys
    assert not any("model.model" in key for key in keys)
    assert {"layers.conv1.weight", "layers.conv4.weight", "layers.norm4.weight",
            "layers.head.weight", "layers.head.bias"} <= set(paper_discriminator.state_dict())


# --- Skip connections -----------------------------------------------------------------------


def test_each_up_block_receives_its_down_blocks_output():
    generator = small_generator().eval()
    seen_down, seen_up = {}, {}
    for k in range(1, generator.depth + 1):
        generator.encoder[f"down{k}"].register_forward_hook(
            lambda m, args, out, k=k: seen_down.__setitem__(k, out.clone()))
        generator.decoder[f"up{k}"].register_forward_pre_hook(
            lambda m, args, k=k: seen_up.__setitem__(k, args[0].clone()))
    with torch.no_grad():
        generator(torch.randn(2, 3, 32, 32))
    assert torch.equal(seen_up[generator.depth], seen_down[generator.depth])  # bottleneck
    for k in range(1, generator.depth):
        skip_channels = seen_down[k].shape[1]
        assert seen_up[k].shape[1] == 2 * skip_channels
        assert torch.equal(seen_up[k][:, skip_channels:], seen_down[k]), f"up{k} skip"


def test_output_depends_on_the_skip_connection():
    generator = small_generator().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        normal = generator(x)
        channels = generator.encoder["down1"].conv.out_channels

        def drop_skip(module, args):
            joined = args[0].clone()
            joined[:, channels:] = 0
            return (joined,)
        handle = generator.decoder["up1"].register_forward_pre_hook(drop_skip)
        without_skip = generator(x)
        handle.remove()
    assert not torch.allclose(normal, without_skip)


# --- The resize-convolution's fast computations, and D's stacked passes ---------------------

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
    generator = small_generator(image_size=256, upsample="resize")
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


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_stacked_passes_give_the_logits_of_separate_passes(norm):
    """D judging real and fake pairs in one stacked pass gives each the logits (and batch-norm
    running statistics) it gets alone: batch statistics are taken per pass."""
    import copy
    torch.manual_seed(0)
    separate = build_discriminator(tiny_model(image_size=64, norm=norm))
    stacked = copy.deepcopy(separate)
    label, real = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    fake = real + 0.5 * torch.randn(3, 3, 64, 64)  # other statistics than the real batch
    expected = [separate(label, real), separate(label, fake)]
    got = stacked(torch.cat([label, label]), torch.cat([real, fake]), passes=2).chunk(2)
    for want, have in zip(expected, got):
        assert torch.allclose(want, have, atol=1e-5)
    stacked_state = stacked.state_dict()
    for key, value in separate.state_dict().items():  # running statistics updated alike
        assert torch.allclose(value.float(), stacked_state[key].float(), atol=1e-6), key
    if norm == "batch":  # the control: joint statistics of the six pairs give other logits
        mixed = stacked(torch.cat([label, label]), torch.cat([real, fake])).chunk(2)
        assert not torch.allclose(mixed[0], got[0], atol=1e-3)


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


# --- Batch norm folded into the convolutions, for use -------------------------------------

def trained_looking(generator):
    """Weights and batch-norm statistics far from their initial values (where folding would
    hide nothing), in eval mode."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in generator.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return generator.eval()


@pytest.mark.parametrize("upsample", ["resize", "transposed"])
def test_batch_norm_folded_generator_gives_the_same_photos(upsample):
    """The folded copy computes the eval-mode generator's function to fp32 rounding, has no
    batch norm left, and leaves the original (its checkpoint) untouched."""
    generator = trained_looking(small_generator(upsample=upsample))
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    x = torch.rand(2, 3, 32, 64) * 2 - 1
    with torch.no_grad():
        photo = generator(x)
        folded = fold_batch_norm(generator)
        folded_photo = folded(x)
    assert photo.std() > 0.05
    assert (folded_photo - photo).abs().max() < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(torch.equal(before[k], v) for k, v in generator.state_dict().items())


def test_batch_norm_folding_refuses_a_training_mode_generator():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batch_norm(small_generator().train())


def test_instance_norm_generator_is_left_as_it_is():
    generator = trained_looking(small_generator(norm="instance"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(fold_batch_norm(generator)(x), generator(x))

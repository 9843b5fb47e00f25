"""The networks: sizes, shapes, receptive fields, dropout, biases, init, names, skips, D's
stacked passes, batch norm folded for use (the resize-convolution's fast paths:
test_resize_conv.py)."""

import pytest
import torch
from torch import nn

from conftest import tiny_model
from models import (ModelConfig, PatchDiscriminator, UNetGenerator, build_discriminator,
                    build_generator, count_parameters, fold_batch_norm)
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


# --- D's stacked passes -----------------------------------------------------------------

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

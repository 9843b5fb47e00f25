"""The quality levers of issue 15, each behind a flag: the paper preset, resize-convolution
upsampling, spectral norm, the hinge loss, D's own learning rate, the generator's EMA."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import losses
import train
from checkpoints import load_checkpoint
from cityscapes import PALETTE
from config import PRESETS, TrainConfig, apply_preset
from conftest import output_flags, tiny_config, tiny_model
from ema import GeneratorEMA
from inference import load_generator
from models import (ModelConfig, ResizeConv2d, build_discriminator, build_generator,
                    count_parameters)
from utils import UserError



def test_the_paper_preset_gives_the_paper_networks():
    config = TrainConfig(**apply_preset({"preset": "paper"}))
    torch.manual_seed(0)
    assert count_parameters(build_generator(config.model_config())) == 54_413_955
    assert count_parameters(build_discriminator(config.model_config())) == 2_768_705
    assert (config.upsample, config.gan_loss, config.ema_decay, config.spectral_norm,
            config.discriminator_lr) == ("transposed", "bce", 0.0, False, 2e-4)


def test_flags_given_with_a_preset_win_and_unknown_presets_are_refused():
    assert apply_preset({"preset": "paper", "upsample": "resize"})["upsample"] == "resize"
    assert apply_preset({"lr": 1e-3}) == {"lr": 1e-3}  # no preset: the defaults
    with pytest.raises(UserError, match="choose one of default, paper"):
        apply_preset({"preset": "best-ever"})
    assert set(PRESETS["paper"]) <= {f for f in TrainConfig.__dataclass_fields__}


def test_checkpoints_without_the_new_keys_get_the_paper_networks():
    old = {k: v for k, v in ModelConfig().to_dict().items()
           if k not in ("upsample", "spectral_norm")}
    assert ModelConfig.from_dict(old) == ModelConfig(upsample="transposed", spectral_norm=False)
    saved = TrainConfig().to_dict()
    for key in ("upsample", "spectral_norm", "lr_d", "ema_decay"):
        saved.pop(key)
    restored = TrainConfig.from_dict(saved)
    assert (restored.upsample, restored.ema_decay, restored.discriminator_lr) == (
        "transposed", 0.0, restored.lr)


def test_resize_upsampling_has_no_transposed_convolution():
    torch.manual_seed(0)
    generator = build_generator(tiny_model(upsample="resize"))
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in generator.modules())
    resize_convs = [m for m in generator.modules() if isinstance(m, ResizeConv2d)]
    assert len(resize_convs) == generator.depth  # each holds a 3x3 kernel, whatever it runs
    assert all(m.conv.weight.shape[-2:] == (3, 3) for m in resize_convs)
    with torch.no_grad():
        assert generator(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="upsample"):
        ModelConfig(upsample="pixelshuffle")


def test_spectral_norm_bounds_every_discriminator_layer():
    torch.manual_seed(0)
    discriminator = build_discriminator(tiny_model(spectral_norm=True))
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    label, photo = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    for _ in range(30):  # power iterations run in train mode
        discriminator(label, photo)
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)


def test_hinge_loss_on_hand_made_logits():
    logits = torch.tensor([2.0, 0.5, -1.0])
    assert losses.gan_loss(logits, True, "hinge").item() == pytest.approx((0 + 0.5 + 2) / 3)
    assert losses.gan_loss(logits, False, "hinge").item() == pytest.approx((3 + 1.5 + 0) / 3)
    assert losses.gan_loss(logits, True, "hinge", for_generator=True).item() == \
        pytest.approx(-0.5)
    total, real, fake = losses.discriminator_loss(logits, -logits, "hinge")
    assert total.item() == pytest.approx(0.5 * (real + fake).item())


def test_ema_is_the_hand_computed_average_with_the_live_batch_norm_statistics():
    live = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = GeneratorEMA(live, decay=0.5)
    before = [p.detach().clone() for p in live.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    live.train()(torch.randn(8, 2))  # moves the running statistics
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(100) == 0.5
    ema.update(live, step=100)
    for averaged, old, new in zip(ema.module.parameters(), before, live.parameters()):
        assert torch.allclose(averaged, 0.5 * old + 0.5 * new)
        assert not torch.equal(averaged, new)
    assert torch.equal(ema.module[1].running_mean, live[1].running_mean)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_generator_pth_holds_the_averaged_weights_and_a_resume_continues_both(tmp_path,
                                                                              demo_set):
    config = tiny_config(tmp_path, demo_set, epochs=2, max_steps=3, ema_decay=0.9, lr_d=1e-3,
                         gan_loss="hinge", upsample="resize", spectral_norm=True)
    train.train(config)
    folder = Path(config.checkpoint_dir)
    latest, shown = load_checkpoint(folder / "latest.pth"), load_checkpoint(
        folder / "generator.pth")
    assert "generator_train" not in shown
    for key, value in shown["generator"].items():
        assert torch.equal(value, latest["generator"][key])
    differs = [k for k, v in latest["generator"].items() if v.is_floating_point() and
               not torch.equal(v, latest["generator_train"][k])]
    assert differs  # the average trails the trained weights
    assert latest["discriminator_optimizer"]["param_groups"][0]["lr"] == 1e-3
    generator, saved = load_generator(folder / "generator.pth")  # the checkpoint alone
    assert saved["model"]["upsample"] == "resize"
    with torch.no_grad():
        assert generator(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    summary = train.main(["--resume", str(folder / "latest.pth"), "--max_steps", "5",
                          *output_flags(config)])
    assert summary["step"] == 5


# --- One-hot label input ------------------------------------------------------------------

def test_one_hot_input_follows_the_one_nearest_colour_rule(tmp_path):
    """On a label map with the public set's profile: blended borders, then JPEG ringing."""
    from PIL import Image

    from cityscapes import nearest_colors
    from demo.data import real_profile_pair, save_real_profile_jpeg
    from models import PaletteOneHot
    save_real_profile_jpeg(real_profile_pair(np.random.default_rng(3), 64)[0],
                           tmp_path / "label.jpg")
    label = np.asarray(Image.open(tmp_path / "label.jpg").convert("RGB"))
    x = torch.tensor(label).permute(2, 0, 1)[None].float() / 127.5 - 1
    onehot = PaletteOneHot()(x)
    assert onehot.shape == (1, len(onehot[0]), 64, 64) and (onehot.sum(1) == 1).all()
    assert np.array_equal(onehot[0].argmax(0).numpy(), nearest_colors(label)[0])


def test_one_hot_models_keep_their_keys_and_load_in_inference(tmp_path):
    from conftest import write_checkpoint
    from inference import Translator
    rgb = build_generator(TrainConfig(image_size=32).model_config()).state_dict()
    onehot = build_generator(TrainConfig(image_size=32, label_input="onehot")
                             .model_config()).state_dict()
    assert list(rgb) == list(onehot)  # no palette buffer in the state dict
    assert onehot["encoder.down1.conv.weight"].shape[1] == len(PALETTE)
    path = write_checkpoint(tmp_path / "g.pth", label_input="onehot")
    generator, config = load_generator(path)
    photo = Translator(generator, config, "cpu").translate([np.zeros((40, 48, 3), np.uint8)])[0]
    assert photo.shape == (40, 48, 3)
    with pytest.raises(UserError, match="needs --direction label2photo"):
        TrainConfig(label_input="onehot", direction="photo2label")
    assert TrainConfig.from_dict({"image_size": 32}).label_input == "rgb"  # old checkpoints

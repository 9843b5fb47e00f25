"""Train pix2pix: conditional GAN loss + lambda * L1, PatchGAN discriminator, U-Net generator.

    python train.py --data_dir ./dataset --epochs 50 --batch_size 4 --lr 2e-4
    python train.py --demo                      # synthetic street scenes, a few minutes on a CPU
    python train.py --resume checkpoints/latest.pth
    torchrun --nproc_per_node=4 train.py ...    # one process per GPU (DDP)
"""

import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import runtime as rt
from config import TrainConfig, build_parser, merge_for_resume
from loader import build_train_loader, build_val_dataset, fixed_batch
from models import build_discriminator, build_generator
from training_state import (RunLog, load_resume_state, make_checkpoint, restore_training_state,
                            save_sample_grid, save_snapshot)
from utils import UserError, make_folder, psnr, run_cli, save_checkpoint

# --- Losses (pure functions of tensors) ----------------------------------------------------


def gan_loss(logits, is_real, kind="bce"):
    """Adversarial loss of a batch of PatchGAN logits against an all-real or all-fake target."""
    target = torch.ones_like(logits) if is_real else torch.zeros_like(logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    if kind == "lsgan":
        return F.mse_loss(logits.float(), target.float())
    raise ValueError(f"unknown GAN loss {kind!r}; choose bce or lsgan")


def discriminator_loss(real_logits, fake_logits, kind="bce"):
    """(loss, real part, fake part); halved as in the paper, to slow D relative to G."""
    real = gan_loss(real_logits, True, kind)
    fake = gan_loss(fake_logits, False, kind)
    return 0.5 * (real + fake), real, fake


def generator_loss(fake_logits, fake, target, lambda_l1, kind="bce"):
    """(loss, adversarial part, L1 part): fool D, and stay near the target in L1."""
    adversarial = gan_loss(fake_logits, True, kind)
    l1 = F.l1_loss(fake.float(), target.float())
    return adversarial + lambda_l1 * l1, adversarial, l1


def lr_factor(epoch, epochs, decay_epochs):
    """Constant for the first `epochs - decay_epochs` epochs, then linearly towards 0.

    NOTE: the reference steps its scheduler before the first epoch, so a one-epoch run there
    trains at LR 0; here epoch 0 always trains at the full LR.
    """
    decay_start = epochs - decay_epochs
    if epoch < decay_start:
        return 1.0
    return 1.0 - (epoch - decay_start + 1) / (decay_epochs + 1)


# --- Validation -------------------------------------------------------------------------------


@torch.no_grad()
def validate(generator, dataset, runtime):
    """Mean L1 and PSNR of the generator (eval mode) over `dataset`, shared among processes."""
    generator.eval()
    l1_sum = psnr_sum = count = 0.0
    indices = list(range(runtime.rank, len(dataset), runtime.world_size))
    for start in range(0, len(indices), runtime.batch_size):
        batch = fixed_batch(dataset, indices[start:start + runtime.batch_size], runtime)
        with runtime.autocast():
            fake = generator(batch["source"]).float()
        target = batch["target"].float()
        l1_sum += (fake - target).abs().flatten(1).mean(1).sum().item()
        psnr_sum += psnr(fake, target).sum().item()
        count += len(target)
    generator.train()
    l1_sum, psnr_sum, count = rt.sum_over_ranks([l1_sum, psnr_sum, count], runtime)
    return {"val_l1": l1_sum / max(count, 1), "val_psnr": psnr_sum / max(count, 1)}


def validation_fid(generator, dataset, runtime, cache):
    """FID and KID of the generator's validation photos (rank 0; the Inception network and
    the real photos' features stay in `cache` between epochs)."""
    from evaluate import fid_of_generator
    scores = fid_of_generator(generator, dataset, runtime.device, runtime.batch_size,
                              cache=cache)
    return {"val_fid": scores["fid"], "val_kid": scores["kid_mean"]}


# --- The training loop ----------------------------------------------------------------------




def train(config: TrainConfig, resume_from=None):
    """Train with `config`; returns a summary (last step and epoch, final validation numbers).

    `resume_from` is (checkpoint dict, its path) of a latest.pth to continue.
    """
    runtime = rt.setup(config)
    try:
        return _train(config, runtime, resume_from)
    finally:
        rt.teardown(runtime)


def _train(config, runtime, resume_from):
    if runtime.is_main:  # fail now, not after the first hour of training
        make_folder(config.checkpoint_dir, "checkpoint_dir")
        make_folder(config.sample_dir, "sample_dir")
        make_folder(Path(config.log_file).parent, "log_file")
        if Path(config.log_file).is_dir():
            raise UserError(f"{config.log_file}: is a folder (--log_file)")

    # Build the networks and optimisers (identical initial weights on every process).
    torch.manual_seed(config.seed)
    model_config = config.model_config()
    generator = rt.prepare(build_generator(model_config), config, runtime)
    discriminator = rt.prepare(build_discriminator(model_config), config, runtime)
    optimizers = (rt.build_adam(generator, config, runtime),
                  rt.build_adam(discriminator, config, runtime))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(
        opt, lambda epoch: lr_factor(epoch, config.epochs, config.decay_epochs))
        for opt in optimizers]
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.precision == "fp16")
    log = RunLog(config, runtime.is_main)
    state = {"step": 0, "epoch": 0, "samples_done": 0, "elapsed": 0.0}
    if resume_from is not None:
        checkpoint, path = resume_from
        state = restore_training_state(checkpoint, path, generator, discriminator, optimizers,
                                       schedulers, scaler, log)
    if runtime.rank > 0:  # other dropout draws on other processes
        torch.manual_seed(config.seed + 1_000_003 * runtime.rank + state["step"])
    generator_step, discriminator_step, discriminator_frozen = rt.wrap(
        generator, discriminator, config, runtime)
    generator_steps_in_backward = rt.step_in_backward(generator, optimizers[0], config, runtime)

    # Data.
    train_loader, sampler = build_train_loader(config, runtime)
    # The decided label half goes into every checkpoint's configuration: a resume reads the
    # same half whatever the detector would say of the folder then.
    config.layout = train_loader.dataset.layout
    config.label_side = train_loader.dataset.label_side or config.label_side
    val_dataset = build_val_dataset(config, runtime, train_loader.dataset)
    sample_batch = fixed_batch(val_dataset, range(min(config.num_samples, len(val_dataset))),
                               runtime)
    stop = rt.StopFlag(runtime)
    # FID needs the Inception weights: fail at start, not after the first epoch.
    fid_cache = {} if config.fid_every_epochs and runtime.is_main else None
    if fid_cache is not None:
        from metrics import inception_path
        inception_path()
    start_time = time.time() - state["elapsed"]
    last_val = {}

    def save_state():
        if not runtime.is_main:
            return
        state["elapsed"] = time.time() - start_time
        folder = runtime.checkpoint_dir
        save_checkpoint(make_checkpoint(config, generator, state), folder / "generator.pth")
        save_checkpoint(make_checkpoint(config, generator, state, discriminator, optimizers,
                                        schedulers, scaler, log), folder / "latest.pth")
        log.save()

    def write_samples():
        if runtime.is_main:
            save_sample_grid(generator, sample_batch, runtime, config.sample_dir, state["step"])

    with stop.installed():
        for epoch in range(state["epoch"], config.epochs):
            state["epoch"] = epoch
            sampler.set_epoch(epoch, skip_samples=state["samples_done"])
            steps_left = len(train_loader)
            batches_done = 0
            bar = tqdm(train_loader, total=steps_left,
                       desc=f"epoch {epoch + 1}/{config.epochs}", disable=not runtime.is_main,
                       dynamic_ncols=True, leave=False)
            for batch in bar:
                source = runtime.to_device(batch["source"])  # (B, 3, H, W) in [-1, 1]
                target = runtime.to_device(batch["target"])
                with runtime.autocast():
                    fake = generator_step(source)

                # Update discriminator: (label, real) vs (label, fake), fake detached.
                discriminator.requires_grad_(True)
                with runtime.autocast():
                    d_loss, d_real, d_fake = discriminator_loss(
                        discriminator_step(source, target),
                        discriminator_step(source, fake.detach()), config.gan_loss)
                scaler.scale(d_loss).backward()
                scaler.step(optimizers[1])
                optimizers[1].zero_grad(set_to_none=True)  # freed now, not kept for a step

                # Update generator through the frozen discriminator (no D gradients, no sync).
                discriminator.requires_grad_(False)
                with runtime.autocast():
                    g_loss, g_adv, g_l1 = generator_loss(
                        discriminator_frozen(source, fake), fake, target, config.lambda_l1,
                        config.gan_loss)
                scaler.scale(g_loss).backward()  # with step_in_backward: G updated here
                if not generator_steps_in_backward:
                    scaler.step(optimizers[0])
                scaler.update()
                optimizers[0].zero_grad(set_to_none=True)

                # Bookkeeping: log, samples, checkpoints, stop requests.
                state["step"] += 1
                batches_done += 1
                state["samples_done"] += config.batch_size * runtime.world_size
                step = state["step"]
                losses = torch.stack([g_adv, g_l1, d_real, d_fake]).detach().tolist()
                log.add_step(losses, step)
                bar.set_postfix(G_adv=f"{losses[0]:.3f}", G_L1=f"{losses[1]:.3f}",
                                D_real=f"{losses[2]:.3f}", D_fake=f"{losses[3]:.3f}")
                end_of_epoch = batches_done == steps_left
                if step % config.log_every_steps == 0 or end_of_epoch:
                    log.flush_steps(step, epoch, optimizers[0].param_groups[0]["lr"],
                                    time.time() - start_time, runtime)
                if config.sample_every_steps and step % config.sample_every_steps == 0:
                    write_samples()
                stopping = stop.poll() or step == config.max_steps
                periodic = config.checkpoint_every_steps and \
                    step % config.checkpoint_every_steps == 0
                if (periodic or stopping) and not end_of_epoch:  # epoch ends save below
                    save_state()
                if stopping:
                    break
            bar.close()
            if batches_done < steps_left:  # stopped mid-epoch
                break

            # End of epoch: validation, LR schedule, samples, checkpoints.
            if (epoch + 1) % config.val_every_epochs == 0 or epoch + 1 == config.epochs:
                last_val = validate(generator, val_dataset, runtime)
                if fid_cache is not None and (epoch + 1) % config.fid_every_epochs == 0:
                    last_val.update(validation_fid(generator, val_dataset, runtime, fid_cache))
                log.add_epoch(epoch, state["step"], last_val, time.time() - start_time)
                if runtime.is_main:
                    fid = f", FID {last_val['val_fid']:.2f}" if "val_fid" in last_val else ""
                    tqdm.write(f"epoch {epoch + 1}/{config.epochs}: step {state['step']}, "
                               f"val L1 {last_val['val_l1']:.4f}, "
                               f"val PSNR {last_val['val_psnr']:.2f} dB{fid}")
            for scheduler in schedulers:
                scheduler.step()
            state["epoch"], state["samples_done"] = epoch + 1, 0
            if not config.sample_every_steps:
                write_samples()
            save_state()
            if runtime.is_main and config.snapshot_every_epochs and \
                    (epoch + 1) % config.snapshot_every_epochs == 0:
                save_snapshot(config, generator, state, runtime.checkpoint_dir)
            if stop.stopped or state["step"] == config.max_steps:
                break

    if stop.stopped and runtime.is_main:
        launcher = "torchrun ... train.py" if runtime.ddp else "python train.py"
        print(f"interrupted at step {state['step']}; resume with: {launcher} --resume "
              f"{runtime.checkpoint_dir / 'latest.pth'}", file=sys.stderr)
    return {"step": state["step"], "epoch": state["epoch"], "interrupted": stop.stopped,
            **last_val}


# --- Command line ---------------------------------------------------------------------------


def parse(argv=None):
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--resume", metavar="CHECKPOINT", default=None,
                        help="continue the run saved in this latest.pth")
    parser.add_argument("--demo", action="store_true", default=False,
                        help="make the synthetic demo set and train on it (a few minutes)")
    args = vars(parser.parse_args(argv))
    return args.pop("resume"), args.pop("demo"), args


def main(argv=None):
    resume, demo, given = parse(argv)
    if demo:
        import demo
        return demo.run(given)
    if resume:
        checkpoint = load_resume_state(resume)
        config = merge_for_resume(checkpoint["config"], given)
        summary = train(config, resume_from=(checkpoint, resume))
    else:
        summary = train(TrainConfig(**given))
    return summary


if __name__ == "__main__":
    summary = run_cli(main)
    if isinstance(summary, dict) and summary.get("interrupted"):
        # Saved and resumable, but not finished: exit as a signal would (130 after Ctrl-C, 143
        # after SIGTERM), so that `train.py && ...` and job schedulers do not take it as done.
        sys.exit(128 + (rt.StopFlag.signal_number or signal.SIGINT))

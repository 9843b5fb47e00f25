"""Train pix2pix: conditional GAN loss + lambda * L1, PatchGAN discriminator, U-Net generator.

    python train.py --data_dir ./dataset --epochs 50 --batch_size 4 --lr 2e-4
    python train.py --demo                      # synthetic street scenes, 6-10 min on 2 CPU cores
    python train.py --resume checkpoints/latest.pth
    torchrun --nproc_per_node=4 train.py ...    # one process per GPU (DDP)

Read top to bottom: the learning rate, the optimisers, one GAN step (`gan_step`, on the losses of
losses.py), validation, and the loop (`train`), whose one step counter drives one maintenance
block (log, validation, samples, checkpoints, stop).
"""

import contextlib
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from tqdm import tqdm

import distributed
import metrics
from checkpoints import (CheckpointWriter, Progress, load_resume_state, restore_training_state,
                         run_file, save_checkpoints)
from config import (TrainConfig, apply_name, apply_preset, build_parser, merge_for_resume,
                    run_paths)
from ema import GeneratorEMA, calibration_indices
from loaders import (build_train_loader, build_val_dataset, fixed_batch, total_steps,
                     training_label_maps)
from labelmaps import in_cityscapes_colours
from losses import (discriminator_loss, generator_loss, labelmix_loss, labelmix_mask,
                    layout_classes, segmenter_loss)
from models import build_discriminator, build_generator
from run_folder import RunLock, claim_outputs, outputs_in_data, resume_command
from segmentation import load_segmenter
from training_log import LOSS_NAMES, LossMeter, RunLog, describe_epoch, save_sample_grid
from utils import UserError, make_folder, one_line, psnr, run_cli

# --- Learning rate --------------------------------------------------------------------------

def lr_factor(epoch, epochs, decay_epochs):
    """Constant for the first `epochs - decay_epochs` epochs, then linearly towards 0. NOTE: the
    reference steps its scheduler before the first epoch (a one-epoch run trains at LR 0 there);
    here epoch 0 always trains at the full LR."""
    decay_start = epochs - decay_epochs
    if epoch < decay_start:
        return 1.0
    return 1.0 - (epoch - decay_start + 1) / (decay_epochs + 1)


# --- Optimisers -----------------------------------------------------------------------------

def adam_kernel(config, device):
    """With --fused_adam one kernel updates every tensor (the same maths); otherwise PyTorch's
    default, which on the CPU is about ten passes per tensor."""
    return {"fused": (config.fused_adam and device.type in ("cpu", "cuda")) or None,
            "foreach": None}


def build_adam(module, config, device):
    return torch.optim.Adam(module.parameters(), lr=config.lr,
                            betas=(config.beta1, config.beta2), **adam_kernel(config, device))


def apply_adam_kernel(optimizer, config, device):
    """Loading a state dict brings back the saved run's kernel options: this run's flags win
    (--no_fused_adam on resume). The step counters go where the chosen kernel keeps them."""
    kernel = adam_kernel(config, device)
    for group in optimizer.param_groups:
        group.update(kernel)
        on_device = bool(group["fused"]) or group.get("capturable", False)
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(param.device if on_device else "cpu")


def step_in_backward(module, optimizer, config, runtime):
    """Update each of `module`'s parameters as soon as backward has finished its gradient, and
    free that gradient: Adam treats every tensor on its own, so this is the update that
    optimizer.step() after backward would make, but the gradients never all exist at once
    (the generator's are 218 MB in fp32). Returns False, changing nothing, where it can't apply:
    under DDP (gradients are averaged after backward) and with fp16 (the gradient scaler
    checks all of them first)."""
    if not config.step_in_backward or runtime.ddp or runtime.precision == "fp16":
        return False

    def update(param):
        optimizer.step()  # only parameters holding a gradient take part: this one
        param.grad = None

    for param in module.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(update)
    return True


# --- One GAN step ---------------------------------------------------------------------------

class Networks(NamedTuple):
    generator: torch.nn.Module  # the modules themselves (weights, modes, checkpoints)
    discriminator: torch.nn.Module
    generator_step: Callable  # what the step calls: DDP-wrapped and/or compiled
    discriminator_step: Callable
    discriminator_frozen: Callable  # D for the generator's update: no gradients, no DDP sync
    segmenter: Optional[torch.nn.Module] = None  # --segmenter_loss: frozen, never trained


def gan_step(nets, optimizers, scaler, source, target, config, runtime, generator_in_backward):
    """One pix2pix update of D, then G. Returns the losses (g_adv, g_l1, d_real, d_fake) as one
    tensor on the device, unread: reading it would make the CPU wait for the GPU."""
    generator_optimizer, discriminator_optimizer = optimizers
    # OASIS: the label map's classes are D's and G's targets (passed only then, as a keyword);
    # with a segmenter, they are its targets on G's photos.
    oasis = config.gan_loss == "oasis"
    classes = layout_classes(source) if oasis or nets.segmenter is not None else None
    layout = {"classes": classes} if oasis else {}
    with runtime.autocast():
        fake = nets.generator_step(source)

    # The discriminator: (label, real) against (label, fake), the fake detached, in one pass
    # over both batches (batch norm keeps each one's statistics, as two passes would).
    # LabelMix (OASIS): a third pass over real and fake mixed along the label map's classes.
    nets.discriminator.requires_grad_(True)
    photos = [target, fake.detach()]
    if layout and config.labelmix:
        mask = labelmix_mask(layout["classes"]).to(target.dtype)
        photos.append(mask * target + (1 - mask) * fake.detach())
    with runtime.autocast():
        logits = nets.discriminator_step(torch.cat([source] * len(photos)), torch.cat(photos),
                                         passes=len(photos)).chunk(len(photos))
        d_loss, d_real, d_fake = discriminator_loss(*logits[:2], config.gan_loss, **layout)
        if len(photos) == 3:
            d_loss = d_loss + config.labelmix * labelmix_loss(logits[2], *logits[:2], mask)
    scaler.scale(d_loss).backward()
    scaler.step(discriminator_optimizer)
    discriminator_optimizer.zero_grad(set_to_none=True)  # freed now, not kept for a step

    # The generator, through the frozen discriminator.
    nets.discriminator.requires_grad_(False)
    with runtime.autocast():
        g_loss, g_adv, g_l1 = generator_loss(nets.discriminator_frozen(source, fake), fake,
                                             target, config.lambda_l1, config.gan_loss, **layout)
        if nets.segmenter is not None:  # (part of G's loss; not one of the logged losses)
            g_loss = g_loss + config.segmenter_loss * segmenter_loss(nets.segmenter(fake),
                                                                     classes)
    scaler.scale(g_loss).backward()  # with step_in_backward: G is updated here
    if not generator_in_backward:
        scaler.step(generator_optimizer)
    scaler.update()
    generator_optimizer.zero_grad(set_to_none=True)
    return torch.stack([g_adv, g_l1, d_real, d_fake]).detach()


# --- Validation -------------------------------------------------------------------------------

@torch.no_grad()
def validate(generator, dataset, runtime):
    """Mean L1 and PSNR of the generator (eval mode, then back in the mode it was in) over
    `dataset`, shared among processes."""
    was_training = generator.training
    generator.eval()
    l1_sum = psnr_sum = count = 0.0
    indices = list(range(runtime.rank, len(dataset), runtime.world_size))
    try:
        for start in range(0, len(indices), runtime.batch_size):
            batch = fixed_batch(dataset, indices[start:start + runtime.batch_size], runtime)
            with runtime.autocast():
                fake = generator(batch["source"]).float()
            target = batch["target"].float()
            l1_sum += (fake - target).abs().flatten(1).mean(1).sum().item()
            psnr_sum += psnr(fake, target).sum().item()
            count += len(target)
    finally:
        generator.train(was_training)
    l1_sum, psnr_sum, count = distributed.sum_over_ranks([l1_sum, psnr_sum, count], runtime)
    return {"val_l1": l1_sum / max(count, 1), "val_psnr": psnr_sum / max(count, 1)}


def every(count, period):
    return period > 0 and count % period == 0


def step_limit_reached(step, config):
    return config.max_steps > 0 and step >= config.max_steps


def epochs_of_batches(loader, sampler, optimizers, progress, config):
    """(epoch, batch, whether it ends its epoch) for every batch left in the run. Each epoch
    first sets its sampler's order (skipping, when resuming mid-epoch, the samples already
    used) and its learning rate, a function of the epoch: --epochs or --decay_epochs changed on
    resume apply from the first resumed epoch."""
    while progress.epoch < config.epochs and not step_limit_reached(progress.step, config):
        epoch = progress.epoch
        factor = lr_factor(epoch, config.epochs, config.decay_epochs)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor
        sampler.set_epoch(epoch, skip_samples=progress.samples_done)
        for done, batch in enumerate(readable_batches(loader), 1):
            yield epoch, batch, done == len(loader)


class UnreadableData(UserError):
    """A training file could not be read mid-run (the data did not fit the cache)."""


def readable_batches(loader):
    """The loader's batches; a file it cannot read becomes UnreadableData, so that the loop
    saves what it has trained before it stops."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UserError as e:
            raise UnreadableData(one_line(e)) from None
        yield batch


# --- The training loop ----------------------------------------------------------------------

@contextlib.contextmanager
def saved_on_bad_data(config, runtime, progress, save, meter):
    """A file the loader cannot read mid-run stops the run naming it, after saving the steps
    trained since the last checkpoint (one process: under torchrun the others would wait)."""
    saved_step = progress.step
    try:
        yield
    except UnreadableData as e:
        if runtime.ddp or progress.step == saved_step or not runtime.is_main:
            raise UserError(str(e)) from None
        *_, any_bad = distributed.sum_over_ranks(meter.totals(), runtime)
        meter.raise_if_bad(any_bad > 0)  # nothing non-finite is saved
        save()
        raise UserError(f"{e}; stopped after saving step {progress.step}: fix or remove the "
                        f"file, then resume with {resume_command(config)}") from None


def frozen_segmenter(config, runtime, label_maps):
    """--segmenter_loss's frozen segmenter on the device, or None; it reads its classes off
    label maps drawn in the Cityscapes colours, checked on `label_maps` (a sample of the
    training label maps, (H, W, 3) uint8)."""
    if not config.segmenter_loss:
        return None
    if not in_cityscapes_colours(label_maps):
        raise UserError(f"{config.data_dir}: the training label maps are not drawn in the "
                        "Cityscapes colours, which --segmenter_loss reads its classes off")
    segmenter = load_segmenter(config.segmenter, runtime.device)
    return segmenter.to(memory_format=torch.channels_last) if runtime.channels_last else segmenter


def train(config: TrainConfig, resume_from=None, overwrite=False):
    """Train with `config`; returns a summary (last step and epoch, final validation numbers).

    `resume_from` is (checkpoint dict, its path) of a latest.pth to continue; `overwrite`
    lets a new run replace the files of an earlier one in the same folders.
    """
    outputs_in_data(config)  # before any output folder is made there
    runtime = distributed.setup(config)
    try:
        # One run at a time in a checkpoint folder, held by the main process until it ends.
        if runtime.is_main:
            make_folder(config.checkpoint_dir, "checkpoint_dir")
        with RunLock(config.checkpoint_dir) if runtime.is_main else contextlib.nullcontext():
            return _train(config, runtime, resume_from, overwrite)
    finally:
        distributed.teardown(runtime)


def _train(config, runtime, resume_from, overwrite):
    if Path(config.log_file).is_dir():
        raise UserError(f"{config.log_file}: is a folder (--log_file)")
    claim_outputs(config, overwrite, resume_from and resume_from[1], runtime.is_main)
    for folder, flag in ((config.checkpoint_dir, "checkpoint_dir"),
                         (config.sample_dir, "sample_dir"), (Path(config.log_file).parent,
                                                             "log_file")):
        if runtime.is_main:  # fail now, not after the first hour of training
            make_folder(folder, flag)

    # `--gan_loss auto` decided on the training label maps, before D is built (OASIS's D has
    # a head per class); part of the run's configuration from here on (a resume keeps it and
    # reads nothing here, so a bad checkpoint is reported before any problem with the data).
    # NOTE: with auto the loader below lists the folder a second time (under a second).
    needs_label_maps = config.gan_loss == "auto" or config.segmenter_loss
    label_maps = list(training_label_maps(config)) if needs_label_maps else []
    gan_loss = config.decide_gan_loss(label_maps)
    if runtime.is_main and gan_loss != config.gan_loss:
        print(f"adversarial loss: {gan_loss} (--gan_loss auto: the training label maps are "
              f"{'' if gan_loss == 'oasis' else 'not '}drawn in the Cityscapes colours)")
    config = replace(config, gan_loss=gan_loss)  # (TrainConfig refuses --labelmix unless oasis)
    segmenter = frozen_segmenter(config, runtime, label_maps)

    # Networks and optimisers: identical initial weights on every process.
    torch.manual_seed(config.seed)
    generator = distributed.prepare(build_generator(config.model_config()), config, runtime)
    discriminator = distributed.prepare(build_discriminator(config.model_config()), config, runtime)
    optimizers = (build_adam(generator, config, runtime.device),
                  build_adam(discriminator, config, runtime.device))
    ema = GeneratorEMA(generator, config.ema_decay) if config.ema_decay else None
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    progress, running = Progress(), None
    if resume_from is not None:
        checkpoint, path = resume_from
        progress, running = restore_training_state(checkpoint, path, generator, discriminator,
                                                   optimizers, scaler, ema)
        for optimizer in optimizers:
            apply_adam_kernel(optimizer, config, runtime.device)
    if runtime.rank > 0:  # other dropout draws on other processes
        torch.manual_seed(config.seed + 1_000_003 * runtime.rank + progress.step)
    nets = Networks(generator, discriminator, *distributed.wrap(generator, discriminator, config,
                                                                runtime), segmenter)
    generator_in_backward = step_in_backward(generator, optimizers[0], config, runtime)
    meter = LossMeter(runtime.device, running)
    shown = ema.module if ema else generator  # what validation, samples and FID see

    # Data. The layout and label half decided on the training pairs are part of the run's
    # configuration, logged from here on: the log, every checkpoint and the console give the
    # same (and a resume reads the same half whatever the detector would say of the folder).
    loader, sampler = build_train_loader(config, runtime)
    config = replace(config, layout=loader.dataset.layout,
                     label_side=loader.dataset.label_side or config.label_side)
    log = RunLog(config, runtime.is_main)
    if resume_from is not None:
        log.resume(progress.step)
    val_dataset = build_val_dataset(config, runtime, loader.dataset)
    sample_batch = fixed_batch(val_dataset, range(min(config.num_samples, len(val_dataset))),
                                  runtime)
    # Training label maps on which the averaged generator's batch-norm statistics are
    # recomputed before each use (the same on every process).
    calibration = fixed_batch(loader.dataset, calibration_indices(len(loader.dataset)),
                              runtime)["source"].split(config.batch_size) if ema else ()
    fid_cache = {} if config.fid_every_epochs and runtime.is_main else None
    if fid_cache is not None:
        metrics.inception_path()  # the weights are needed: fail now, not after an epoch

    stop = distributed.StopFlag(runtime)
    start_time = time.time() - progress.elapsed
    last_val = {}
    # The bar is closed on an error too, so that the error's line does not land on the bar's;
    # the writer finishes the last checkpoint before train() returns or raises.
    with stop.installed(), CheckpointWriter() as writer, tqdm(
            initial=progress.step, total=total_steps(config, loader, runtime), unit="step",
            disable=not runtime.is_main, dynamic_ncols=True, leave=False) as bar, \
            saved_on_bad_data(config, runtime, progress, lambda: save_checkpoints(
                writer, config, nets, ema, optimizers, scaler, meter, progress, False), meter):
        for epoch, batch, epoch_end in epochs_of_batches(loader, sampler, optimizers, progress,
                                                         config):
            source = runtime.to_device(batch["source"])  # (B, 3, H, W) in [-1, 1]
            target = runtime.to_device(batch["target"])
            losses = gan_step(nets, optimizers, scaler, source, target, config, runtime,
                              generator_in_backward)
            if ema:
                ema.update(generator, progress.step)
            progress.step += 1
            progress.samples_done += config.batch_size * runtime.world_size
            if epoch_end:
                progress.epoch, progress.samples_done = epoch + 1, 0
            meter.add(losses, progress.step)
            bar.set_description(f"epoch {epoch + 1}/{config.epochs}", refresh=False)
            bar.update()

            # Maintenance: what is due at this step (or at this epoch's end).
            step = progress.step
            stopping = (stop.due(step, epoch_end) and stop.poll()) or \
                step_limit_reached(step, config)
            save = epoch_end or stopping or every(step, config.checkpoint_every_steps)
            write_log = epoch_end or every(step, config.log_every_steps)
            samples = every(step, config.sample_every_steps) or (
                epoch_end and not config.sample_every_steps)
            validation = epoch_end and (every(progress.epoch, config.val_every_epochs) or
                                        progress.epoch == config.epochs)
            if not (save or write_log or samples or validation):
                continue
            if ema and (save or samples or validation):
                with runtime.autocast():
                    ema.recalibrate(calibration)
            # The losses are read here, once; nothing is written if one was not finite.
            *sums, count, any_bad = distributed.sum_over_ranks(meter.totals(), runtime)
            meter.raise_if_bad(any_bad > 0)
            if write_log:
                means = {name: s / max(count, 1) for name, s in zip(LOSS_NAMES, sums)}
                log.add_steps(step, epoch, means, optimizers[0].param_groups[0]["lr"],
                              time.time() - start_time)
                meter.reset()
                bar.set_postfix({name: f"{v:.3f}" for name, v in means.items()})
            if validation:
                last_val = validate(shown, val_dataset, runtime)
                if fid_cache is not None and every(progress.epoch, config.fid_every_epochs):
                    scores = metrics.fid_of_generator(shown, val_dataset, runtime.device,
                                                      runtime.batch_size, fid_cache)
                    last_val.update(val_fid=scores["fid"], val_kid=scores["kid_mean"])
                log.add_epoch(epoch, step, last_val, time.time() - start_time)
                if runtime.is_main:
                    tqdm.write(describe_epoch(epoch, config.epochs, step, last_val))
            if samples and runtime.is_main:
                log.add_sample_grid(save_sample_grid(shown, sample_batch, runtime,
                                                     config.sample_dir, step), step)
            if save and runtime.is_main:
                progress.elapsed = time.time() - start_time
                snapshot = epoch_end and every(progress.epoch, config.snapshot_every_epochs)
                save_checkpoints(writer, config, nets, ema, optimizers, scaler, meter, progress,
                                 snapshot)
            if stopping:
                break

    if stop.stopped and runtime.is_main:
        launcher = "torchrun ... train.py" if runtime.ddp else "python train.py"
        print(f"interrupted at step {progress.step}; resume with: "
              f"{resume_command(config, launcher)}", file=sys.stderr)
    return {"step": progress.step, "epoch": progress.epoch, "interrupted": stop.stopped,
            **last_val}


# --- Command line ---------------------------------------------------------------------------

def parse(argv=None):
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--resume", metavar="CHECKPOINT", default=None,
                        help="continue the run saved in this latest.pth or run folder")
    parser.add_argument("--overwrite", action="store_true", default=False,
                        help="start a new run where another run's checkpoints, log or sample "
                             "grids are, removing them (without it, such a start is refused)")
    parser.add_argument("--demo", action="store_true", default=False,
                        help="make the synthetic demo set and train on it "
                             "(6-10 min on 2 CPU cores)")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")  # a latest.pth, or a run folder (runs/NAME) holding one
    flags = (resume and run_file(resume, "latest.pth"), args.pop("overwrite"), args.pop("demo"))
    given = apply_name(apply_preset(args) if "preset" in args else args)
    if resume and Path(resume).is_dir() and (Path(resume) / "checkpoints").is_dir() and \
            "name" not in given:  # a run folder on the command line: the run goes on there
        given = {**run_paths("", folder=resume.rstrip("/\\")), **given}
    return (*flags, given)


def main(argv=None):
    resume, overwrite, demo, given = parse(argv)
    if demo:
        from demo.run import demo_config, report
        config = demo_config(given)
        return report(config, train(config, overwrite=overwrite))
    if resume:
        checkpoint = load_resume_state(resume)
        config = merge_for_resume(checkpoint["config"], given)
        return train(config, resume_from=(checkpoint, resume), overwrite=overwrite)
    return train(TrainConfig(**given), overwrite=overwrite)


if __name__ == "__main__":
    summary = run_cli(main)
    if isinstance(summary, dict) and summary.get("interrupted"):
        # Saved and resumable, but not finished: exit as a signal would (130 after Ctrl-C, 143
        # after SIGTERM), so that `train.py && ...` and job schedulers do not take it as done.
        sys.exit(128 + (distributed.StopFlag.signal_number or signal.SIGINT))

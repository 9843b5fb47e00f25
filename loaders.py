"""The data each training process is fed: the resumable, sharded epoch order (EpochSampler),
the training loader and the validation set built from a TrainConfig, and fixed batches on the
device (validation, sample grids). dataset.py owns what a pair is and how it is read.
"""

import os
import signal
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from dataset import PairDataset, find_pairs, load_pair
from labelmaps import SAMPLE_FILES
from utils import UserError


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: one shuffled order per epoch from (seed, epoch), dealt to the
    processes round-robin by DistributedSampler, and able to start mid-epoch when resuming.

    The epoch travels with each key so that augmentation draws depend on (seed, epoch, index)
    only, whichever loader worker or process handles the sample. Resuming skips the samples the
    whole run already used this epoch, so it stays exact even with another number of processes.
    """

    def __init__(self, num_samples, seed=0, shuffle=True, rank=0, world_size=1):
        self.order = DistributedSampler(range(num_samples), num_replicas=1, rank=0,
                                        shuffle=shuffle, seed=seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.indices = []

    def set_epoch(self, epoch, skip_samples=0):
        self.epoch = epoch
        self.order.set_epoch(epoch)
        remaining = list(self.order)[skip_samples:]
        # Rank r takes remaining[r::world_size] (padded to equal lengths, as DDP needs).
        shard = DistributedSampler(remaining, num_replicas=self.world_size, rank=self.rank,
                                   shuffle=False)
        self.indices = [remaining[i] for i in shard]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices])

    def __len__(self):
        return len(self.indices)


def cache_fits(num_pairs, load_size):
    """Whether decoded pairs fit comfortably in memory (a quarter of it, 8 GiB at most)."""
    needed = num_pairs * 2 * 3 * load_size * load_size
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return needed <= min(total // 4, 8 << 30)


def split_folder(config, split):
    if not Path(config.data_dir).is_dir():
        raise UserError(f"{config.data_dir}: data folder not found (--data_dir)")
    return Path(config.data_dir) / split


def train_folder(config):
    folder = split_folder(config, "train")
    if not folder.is_dir():
        raise UserError(f"{folder}: not found; --data_dir must hold train/ and val/ folders")
    return folder


def training_label_maps(config, count=SAMPLE_FILES):
    """Up to `count` label maps of the training split, (H, W, 3) uint8 as read from disk,
    spread evenly over it (consecutive files are often frames of one drive), read one at a
    time as they are asked for."""
    pairs = find_pairs(train_folder(config), config.layout, config.label_side)[0]
    for pair in pairs[::max(1, len(pairs) // count)][:count]:
        yield load_pair(pair, config.label_format)[0]


def build_train_loader(config, runtime):
    folder = train_folder(config)
    dataset = PairDataset(folder, image_size=config.image_size, load_size=config.load_size,
                          train=True, crop=config.crop, flip=config.flip,
                          direction=config.direction, layout=config.layout,
                          label_side=config.label_side, label_format=config.label_format,
                          seed=config.seed)
    cache = config.cache == "on" or (config.cache == "auto" and
                                     cache_fits(len(dataset), config.load_size))
    if cache:
        dataset.fill_cache()
    if runtime.is_main:
        print(f"{folder}: {len(dataset)} pairs, layout {dataset.layout}"
              f"{', cached in memory' if cache else ''}")
        if dataset.evidence:
            print(f"  {dataset.evidence}")
    sampler = EpochSampler(len(dataset), seed=config.seed, rank=runtime.rank,
                           world_size=runtime.world_size)
    workers = config.loader_workers()
    # A generator of its own: each epoch's iterator draws a seed from it, which from the global
    # one would shift the dropout masks of a resumed run against the uninterrupted run's.
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=runtime.device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed),
                        worker_init_fn=ignore_stop_signals if workers else None)
    return loader, sampler


def ignore_stop_signals(worker_id):
    """In a loader worker: Ctrl-C and SIGTERM are the main process's to handle (it finishes the
    step, saves and stops the workers). A forked worker inherits the main process's handler;
    one started by spawn or forkserver (macOS; Linux from Python 3.14) would die of the signal,
    and the main process would fail with "worker exited unexpectedly" instead of saving."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def build_val_dataset(config, runtime, train_dataset):
    folder = split_folder(config, "val")
    if not folder.is_dir():
        if runtime.is_main:  # once, not once per process
            warnings.warn(f"{folder}: not found; validating on the training pairs (no "
                          "augmentation)", stacklevel=2)
        folder = train_dataset.folder
    # The label half was decided once, on the training set.
    dataset = PairDataset(folder, image_size=config.image_size, train=False,
                          direction=config.direction, layout=train_dataset.layout,
                          label_side=train_dataset.label_side or "auto",
                          label_format=config.label_format)
    # Validation sees the same pairs every epoch: decode them once, like the training set.
    if train_dataset.cache is not None and cache_fits(len(dataset), config.image_size):
        dataset.fill_cache()
    return dataset


def total_steps(config, loader, runtime):
    """Steps of the whole run, for the progress bar (from a full epoch's length)."""
    per_process = -(-len(loader.dataset) // runtime.world_size)
    steps = config.epochs * -(-per_process // config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


def fixed_batch(dataset, indices, runtime):
    """A batch of chosen items (no augmentation keys), on the device."""
    items = [dataset[i] for i in indices]
    if not items:
        raise UserError(f"{dataset.folder}: no pairs to validate on")
    return {key: runtime.to_device(torch.stack([item[key] for item in items]))
            for key in ("source", "target")}

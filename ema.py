"""The generator's exponential moving average (--ema_decay): the weights validation, samples,
generator.pth and inference use, and their batch-norm statistics recomputed before each use.
"""

import copy

import torch

EMA_CALIBRATION_PAIRS = 64  # training label maps that give the averaged generator its statistics


def calibration_indices(num_pairs, count=EMA_CALIBRATION_PAIRS):
    """Which training pairs give the averaged generator its batch-norm statistics: `count`
    spread evenly over the whole set (all of them if it has fewer). Not the first `count`: a
    real set's files in name order are consecutive frames of one drive (CamVid, Cityscapes),
    and statistics from one street gave L1 0.38 on CamVid where spread ones gave 0.18."""
    if num_pairs <= count:
        return list(range(num_pairs))
    return [round(i * (num_pairs - 1) / (count - 1)) for i in range(count)]


class GeneratorEMA:
    """An exponential moving average of the generator's weights (Karras et al. 2018; Yazici et
    al. 2019): validation, samples, generator.pth and inference use `module`.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so that the first steps'
    random weights are soon forgotten; it is a function of the step, so nothing but the
    averaged weights needs saving. Batch-norm running statistics are copied from the live
    generator at every update (as StyleGAN2-ADA does), but those belong to the live weights,
    which the averaged ones trail by about 1 / (1 - decay) steps: on real photos that gave the
    photos a colour cast (docs/quality.md). So before the averaged generator is used (validation,
    samples, a checkpoint) `recalibrate` gives it the statistics of its own weights.
    """

    def __init__(self, generator, decay):
        self.decay = decay
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def recalibrate(self, label_batches):
        """Batch-norm running statistics of the averaged weights themselves: the plain average
        over `label_batches` (training label maps, each a batch of the training size) of the
        batch statistics those weights produce, dropout off."""
        norms = [m for m in self.module.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average
            norm.train()
        try:
            for labels in label_batches:
                self.module(labels)
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
                norm.eval()

    @torch.no_grad()
    def update(self, generator, step):
        averaged, live = list(self.module.parameters()), list(generator.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in live], 1 - self.decay_at(step))
        for mine, theirs in zip(self.module.buffers(), generator.buffers()):
            mine.copy_(theirs)


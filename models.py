"""The pix2pix networks: a U-Net generator and a PatchGAN discriminator.

Both follow the reference pix2pix implementation layer for layer (same widths, kernels, norms,
biases, dropout and init), but are written flat with readable names, so a state dict reads
`encoder.down3.conv.weight` rather than `model.model.1.model.3...`.
"""

import copy
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import declared, option


def _batch_norm(channels):
    return nn.BatchNorm2d(channels)


def _instance_norm(channels):
    # The reference uses non-affine instance norm without running statistics.
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


NORMS = {"batch": _batch_norm, "instance": _instance_norm}


# What the generator's convolutions take beyond the image's border. Zeros tell every level where
# the border is, and a trained network draws a faint frame of lines a few pixels inside the
# border of every photo (docs/quality.md, "The frame along the border"). "shallow" repeats
# the edge pixels instead at the levels whose input is at least SHALLOW_SIZE pixels across
# and keeps zeros at the deep ones, whose position code is the layout's coarse prior: no
# frame. "replicate" repeats them at every level.
PADDINGS = ("zeros", "shallow", "replicate")
SHALLOW_SIZE = 16


def level_padding(padding, input_size):
    """The padding mode of a level whose input is `input_size` pixels across."""
    replicate = padding == "replicate" or (padding == "shallow" and input_size >= SHALLOW_SIZE)
    return "replicate" if replicate else "zeros"


class TransposedConv2d(nn.ConvTranspose2d):
    """The paper's 4x4 stride-2 transposed convolution (padding 1). With `padding_mode`
    "replicate" the input's edge pixels are repeated once around it first and the outputs
    they add beyond the border cropped (padding 3): a transposed convolution has no padding
    mode of its own."""

    def __init__(self, c_in, c_out, bias, padding_mode="zeros"):
        self.replicate = padding_mode == "replicate"
        super().__init__(c_in, c_out, 4, stride=2, padding=3 if self.replicate else 1,
                         bias=bias)

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, 2H, 2W)
        return super().forward(F.pad(x, (1, 1, 1, 1), mode="replicate") if self.replicate
                               else x)


def _transposed_conv(c_in, c_out, bias, padding_mode="zeros"):
    if padding_mode == "zeros":  # the paper's layer as it is
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias)
    return TransposedConv2d(c_in, c_out, bias, padding_mode)


# Along one axis, "nearest 2x, then taps (w0, w1, w2)" equals a stride-2 transposed convolution
# with taps (w2, w1 + w2, w0 + w1, w0): output 2i sees the upsampled pixels 2i-1, 2i, 2i+1, that
# is inputs i-1, i, i; output 2i+1 sees inputs i, i, i+1; and a transposed convolution (stride 2,
# padding 1) sends input i to output 2i-1+k with tap k. Rows: the 4 taps; columns: the 3.
_FOLD_1D = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def _fold_matrix(like):
    """(16, 9): the 4x4 taps of the transposed convolution as sums of the 3x3 taps."""
    fold_1d = torch.tensor(_FOLD_1D, dtype=like.dtype, device=like.device)
    return torch.kron(fold_1d, fold_1d)


def fold_resize_kernel(weight):
    """The 3x3 kernel of "nearest 2x, then a 3x3 convolution (padding 1)" as the 4x4 kernel of
    the stride-2 transposed convolution (padding 1) that computes the same function:
    (C_out, C_in, 3, 3) -> (C_in, C_out, 4, 4). One small matrix product, kept in the weight's
    own dtype under autocast (the convolution rounds the folded sums once, not each tap)."""
    c_out, c_in = weight.shape[:2]
    with torch.autocast(weight.device.type, enabled=False):
        folded = weight.transpose(0, 1).reshape(c_in * c_out, 9) @ _fold_matrix(weight).t()
    return folded.view(c_in, c_out, 4, 4)


def tap_matrix(weight):
    """(C_out, C_in, 3, 3) -> (C_out * 9, C_in): row (o, ky, kx) is tap (ky, kx) of output
    channel o, for one matrix product of every input pixel with every tap."""
    return weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])


def resize_conv_by_taps(x, taps, bias, channels_last=False):
    """"Nearest 2x, then a 3x3 convolution" computed at the input's resolution: one matrix
    product gives each input pixel times each of the 9 taps (a quarter of the multiply-adds
    of convolving the upsampled input, 9/16 of the transposed convolution's), the 9 products
    are summed into the transposed convolution's 16 (`_FOLD_1D`; C_out * 144 per pixel, not
    C_in * C_out), and col2im adds each into its 4x4 window of the output.
    `taps` is `tap_matrix(weight)`; x (B, C_in, H, W) -> (B, C_out, 2H, 2W), channels-last
    where x is or `channels_last` asks (a 1x1 input is both formats: the model's decides)."""
    batch, c_in, height, width = x.shape
    c_out = taps.shape[0] // 9
    pixels = x.permute(0, 2, 3, 1).reshape(-1, c_in)  # (B*H*W, C_in), a view if channels-last
    products = F.linear(pixels, taps).view(-1, c_out, 9)
    windows = (products @ _fold_matrix(products).t()).view(batch, height * width, c_out * 16)
    out = F.fold(windows.transpose(1, 2), (2 * height, 2 * width), kernel_size=4, stride=2,
                 padding=1)  # (B, C_out, 2H, 2W)
    if channels_last or (x.is_contiguous(memory_format=torch.channels_last) and
                         not x.is_contiguous()):
        out = out.contiguous(memory_format=torch.channels_last)  # the network's own format
    return out if bias is None else out + bias.view(1, -1, 1, 1).to(out.dtype)


class ResizeConv2d(nn.Module):
    """Odena et al. 2016: nearest 2x upsampling then a 3x3 convolution. Every output pixel sees
    the same number of input pixels, so there is no checkerboard for the network to unlearn.

    The 3x3 convolution `conv` holds the parameters (state-dict keys `conv.weight`,
    `conv.bias`), but the upsampled input is never made. Inputs of up to `max_tap_area` pixels
    (the U-Net's deep levels, 512-1024 channels, where the work is the weights' rather than the
    pixels') multiply each input pixel by the 9 taps in one matrix product and add the
    products into place (`resize_conv_by_taps`); larger inputs run a 4x4 stride-2 transposed
    convolution with the folded kernel (`fold_resize_kernel`). The same function for a
    quarter and 4/9 of the plain computation's multiply-adds, each measured the faster where
    it runs (docs/performance.md). `computation` forces "taps", "transposed" or "plain"
    (nearest 2x, then the convolution: the reference the tests compare with).
    """

    # Inputs of up to 8x8: at 256x256 the U-Net's four deepest levels (1x1 to 8x8 inputs).
    max_tap_area = 64
    computation = "auto"

    def __init__(self, c_in, c_out, bias, padding_mode="zeros"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias, padding_mode=padding_mode)
        self._prepared = {}  # kind -> (weight's identity and version, its prepared form)

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, 2H, 2W)
        computation = self.computation
        if computation == "auto":
            # A traced graph (torch.compile, export) takes one path for every size.
            small = not torch.compiler.is_compiling() and \
                x.shape[-2] * x.shape[-1] <= self.max_tap_area
            computation = "taps" if small else "transposed"
        if computation == "plain":
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        if computation == "taps":
            weight = self.conv.weight
            out = resize_conv_by_taps(x, self.prepared(tap_matrix), self.conv.bias,
                                      weight.is_contiguous(memory_format=torch.channels_last)
                                      and not weight.is_contiguous())
        else:
            out = F.conv_transpose2d(x, self.prepared(fold_resize_kernel), self.conv.bias,
                                     stride=2, padding=1)
        return self.add_edges(out, x) if self.conv.padding_mode == "replicate" else out

    def add_edges(self, out, x):
        """Zero padding's result + what the repeated edge adds: the upsampled input's edge
        rows beyond the top and bottom (each repeated at its own ends, the corners) times the
        kernel's top and bottom rows of taps, and its edge columns beyond the left and right
        times the outer columns of taps. Only the output's outer rows and columns change; a
        few thin convolutions instead of a padded copy and the border outputs it would add."""
        weight = self.conv.weight.to(out.dtype)
        x = x.to(out.dtype)
        edge_rows = torch.cat([x[..., :1, :], x[..., -1:, :]], dim=-2)
        edge_cols = torch.cat([x[..., :1], x[..., -1:]], dim=-1)
        up_rows = edge_rows.repeat_interleave(2, dim=-1)  # nearest 2x along the edge
        up_cols = edge_cols.repeat_interleave(2, dim=-2)
        rows = F.pad(up_rows, (1, 1, 0, 0), mode="replicate")  # (B, C, 2, 2W + 2)
        cols = F.pad(up_cols, (0, 0, 1, 1))  # (B, C, 2H + 2, 2): corners counted in rows
        top, bottom = (F.conv2d(rows[..., k:k + 1, :], weight[..., 2 * k:2 * k + 1, :])
                       for k in (0, 1))
        left, right = (F.conv2d(cols[..., k:k + 1], weight[..., 2 * k:2 * k + 1]) for k in (0, 1))
        # Joined, not added in place into slices: autograd would copy the whole gradient for
        # each slice, and a traced graph (export) would guard against a batch of 1.
        out = torch.cat([out[..., :1, :] + top, out[..., 1:-1, :], out[..., -1:, :] + bottom],
                        dim=-2)  # (2H x 2W: at least 2 rows and columns)
        return torch.cat([out[..., :1] + left, out[..., 1:-1], out[..., -1:] + right], dim=-1)

    def prepared(self, form):
        """`form(weight)`; without gradients (inference, validation) made once and kept until
        the weight changes, so translating costs only the products."""
        weight = self.conv.weight
        if (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling():
            return form(weight)  # (a compiled graph folds constants itself)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        kept = self._prepared.get(form.__name__)
        if kept is None or kept[0] != key:
            kept = self._prepared[form.__name__] = (key, form(weight.detach()))
        return kept[1]


def _resize_conv(c_in, c_out, bias, padding_mode="zeros"):
    return ResizeConv2d(c_in, c_out, bias, padding_mode)


UPSAMPLES = {"transposed": _transposed_conv, "resize": _resize_conv}


def norm_layer(norm):
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(NORMS)}")
    return NORMS[norm]


@dataclass
class ModelConfig:
    """Everything needed to rebuild the networks; saved inside every checkpoint. The settings
    train.py exposes are declared here once (TrainConfig takes them from here); a checkpoint
    saved before one existed gets its `legacy` value: that run's networks."""

    in_channels: int = option(3, "channels of the generator's input (the label map)",
                              minimum=1)
    out_channels: int = option(3, "channels of the generator's output (the photo)", minimum=1)
    image_size: int = option(256, "training crop in pixels (a power of two; sets U-Net depth)",
                             minimum=1)
    generator_channels: int = option(64, "width of the generator's first layer", minimum=1,
                                     paper=64)
    discriminator_channels: int = option(64, "width of the discriminator's first layer",
                                         minimum=1, paper=64)
    discriminator_layers: int = option(3, "PatchGAN depth: 0 pixel, 1 16x16, 3 70x70, 5 "
                                       "286x286", minimum=0, paper=3)
    norm: str = option("batch", "normalisation layers", tuple(NORMS), paper="batch")
    dropout: bool = option(True, "dropout in the generator's deep decoder blocks", paper=True)
    upsample: str = option("resize", "generator's upsampling: transposed convolution (paper) or "
                           "nearest resize + 3x3 convolution", tuple(UPSAMPLES),
                           paper="transposed", legacy="transposed")
    padding: str = option("zeros", "what the generator's convolutions take beyond the image's "
                          "border: zeros (the paper; the network draws a faint frame of lines "
                          "along the border of every photo); shallow: the edge pixels "
                          "repeated at the levels of 16x16 pixels and more, zeros at the deep "
                          "ones (no frame; on real photos KID a little worse); replicate: "
                          "repeated at every level", PADDINGS, paper="zeros", legacy="zeros")
    discriminator_classes: int = option(0, "0: D gives one real/fake logit per patch; N > 0 "
                                        "(OASIS): D sees the photo alone and gives N + 1 logits "
                                        "per patch, 'fake' and the N label classes", minimum=0)

    def __post_init__(self):
        for f in fields(self):
            value, choices, minimum = (getattr(self, f.name), f.metadata["choices"],
                                       f.metadata["minimum"])
            if choices and value not in choices:
                raise ValueError(f"unknown {f.name} {value!r}; choose one of "
                                 f"{', '.join(choices)}")
            if minimum is not None and value < minimum:
                raise ValueError(f"{f.name} must be >= {minimum}")
        size = self.image_size
        if size < 4 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two >= 4, got {size}")

    @property
    def depth(self):
        """Number of stride-2 levels of the U-Net: the bottleneck is 1x1."""
        return int(math.log2(self.image_size))

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        return cls(**declared(cls, "legacy") | {k: v for k, v in values.items() if k in known})


def init_weights(module):
    """Conv weights from N(0, 0.02) and zero biases; batch-norm scales from N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class UNetGenerator(nn.Module):
    """U-Net: `depth` stride-2 down blocks, mirrored up blocks, skip connections by concatenation.

    Level k (1..depth) has width base * min(2^(k-1), 8). `up{k}` mirrors `down{k}`: it takes the
    output of `up{k+1}` concatenated with the output of `down{k}` (only `down{depth}` at the
    bottom) and returns the resolution of `down{k}`'s input.
    """

    def __init__(self, in_channels=3, out_channels=3, base_channels=64, depth=8,
                 norm="batch", dropout=True, upsample="transposed", padding="zeros"):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        make_norm = norm_layer(norm)
        make_upsample = UPSAMPLES[upsample]
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; choose one of {PADDINGS}")
        # NOTE: like the reference, convolutions carry a bias only with instance norm
        # (affine-free), also where no norm follows (outermost and innermost down convs).
        bias = norm == "instance"
        widths = [base_channels * min(2 ** k, 8) for k in range(depth)]
        self.depth = depth

        self.encoder = nn.ModuleDict()
        for k in range(1, depth + 1):
            layers = OrderedDict()
            c_in = in_channels if k == 1 else widths[k - 2]
            layers["conv"] = nn.Conv2d(c_in, widths[k - 1], 4, stride=2, padding=1, bias=bias,
                                       padding_mode=level_padding(padding, 2 ** (depth - k + 1)))
            if 1 < k < depth:
                layers["norm"] = make_norm(widths[k - 1])
            # NOTE: the reference applies this LeakyReLU in place at the start of the next
            # block, so its skip connections carry the activated features; ending the block
            # with it gives the same maths without relying on in-place mutation.
            if k < depth:
                layers["act"] = nn.LeakyReLU(0.2, inplace=True)
            self.encoder[f"down{k}"] = nn.Sequential(layers)

        self.decoder = nn.ModuleDict()
        for k in range(depth, 0, -1):
            layers = OrderedDict()
            c_in = widths[k - 1] if k == depth else 2 * widths[k - 1]
            layers["act"] = nn.ReLU(inplace=True)
            mode = level_padding(padding, 2 ** (depth - k))  # this block's input size
            if k == 1:
                layers["conv"] = make_upsample(c_in, out_channels, True, mode)
                layers["tanh"] = nn.Tanh()
            else:
                layers["conv"] = make_upsample(c_in, widths[k - 2], bias, mode)
                layers["norm"] = make_norm(widths[k - 2])
                # The paper's only noise: dropout in the deep 8x-wide blocks above the
                # bottleneck (levels 5..depth-1: three blocks at depth 8).
                if dropout and 5 <= k < depth:
                    layers["dropout"] = nn.Dropout(0.5)
            self.decoder[f"up{k}"] = nn.Sequential(layers)
        init_weights(self)

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W) in [-1, 1]
        skips = []
        for block in self.encoder.values():
            x = block(x)
            skips.append(x)
        x = self.decoder[f"up{self.depth}"](skips.pop())
        for k in range(self.depth - 1, 0, -1):
            x = self.decoder[f"up{k}"](torch.cat([x, skips.pop()], dim=1))
        return x


class PatchDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake logits, each judging one receptive-field patch.

    `num_layers` stride-2 blocks then a stride-1 block and a 1-channel head: 3 layers give the
    paper's 70x70 patches (30x30 logits at 256x256), 1 gives 16x16, 5 gives 286x286; 0 gives the
    1x1 PixelGAN. Input: label map and photo concatenated on channels; with `num_classes` N > 0
    (OASIS, Schoenfeld et al. 2021) the photo alone, and N + 1 logits per patch ("fake", then
    the N classes): a D that saw the label map could read the layout off it instead of the photo.
    """

    def __init__(self, in_channels=6, base_channels=64, num_layers=3, norm="batch",
                 num_classes=0):
        super().__init__()
        self.conditional = num_classes == 0
        head_channels = num_classes + 1 if num_classes else 1
        make_norm = norm_layer(norm)
        bias = norm == "instance"
        layers = OrderedDict()
        if num_layers == 0:  # PixelGAN: 1x1 convolutions only
            layers["conv1"] = nn.Conv2d(in_channels, base_channels, 1)
            layers["act1"] = nn.LeakyReLU(0.2, inplace=True)
            layers["conv2"] = nn.Conv2d(base_channels, 2 * base_channels, 1, bias=bias)
            layers["norm2"] = make_norm(2 * base_channels)
            layers["act2"] = nn.LeakyReLU(0.2, inplace=True)
            layers["head"] = nn.Conv2d(2 * base_channels, head_channels, 1, bias=bias)
        else:
            c_out = base_channels
            layers["conv1"] = nn.Conv2d(in_channels, c_out, 4, stride=2, padding=1)
            layers["act1"] = nn.LeakyReLU(0.2, inplace=True)
            for k in range(2, num_layers + 2):
                c_in, c_out = c_out, base_channels * min(2 ** (k - 1), 8)
                stride = 2 if k <= num_layers else 1  # the last block keeps the resolution
                layers[f"conv{k}"] = nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1,
                                               bias=bias)
                layers[f"norm{k}"] = make_norm(c_out)
                layers[f"act{k}"] = nn.LeakyReLU(0.2, inplace=True)
            layers["head"] = nn.Conv2d(c_out, head_channels, 4, stride=1, padding=1)
        self.layers = nn.Sequential(layers)
        init_weights(self)

    def forward(self, label, photo, passes=1):
        """(B, C1, H, W), (B, C2, H, W) -> (B, 1, h, w) logits (OASIS: (B, N + 1, h, w)).

        `passes` > 1: the batch is that many equal batches stacked (real pairs, then fake ones)
        that go through the convolutions together, in larger matrix products, while each
        normalisation layer takes each one's statistics on its own: the logits of separate
        passes, which `.chunk(passes)` splits again."""
        x = torch.cat([label, photo], dim=1) if self.conditional else photo
        for layer in self.layers:
            if passes > 1 and isinstance(layer, nn.modules.batchnorm._NormBase):
                x = torch.cat([layer(part) for part in x.chunk(passes)])
            else:
                x = layer(x)
        return x


def fold_batch_norm(generator):
    """A copy of an eval-mode generator with each batch norm folded into the convolution
    before it: the running statistics and the affine become a per-channel scale of that
    convolution's weight and its bias, the norm layer an identity. The same function (to fp32
    rounding) in one layer instead of two, and a network whose every weight can be cast to bf16
    once instead of at every call. For inference only: the copy has no batch norm to train.
    Instance norm (no running statistics) is left as it is."""
    if generator.training:
        raise ValueError("fold_batch_norm needs an eval-mode generator: in training mode batch "
                         "norm uses each batch's own statistics")
    fused = copy.deepcopy(generator)
    for block in [*fused.encoder.values(), *fused.decoder.values()]:
        norm = getattr(block, "norm", None)
        if not isinstance(norm, nn.BatchNorm2d) or not norm.track_running_stats:
            continue
        conv = block.conv.conv if isinstance(block.conv, ResizeConv2d) else block.conv
        out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0  # (C_in, C_out, k, k)
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.affine:
                scale = scale * norm.weight
            shape = [1] * conv.weight.dim()
            shape[out_dim] = -1
            conv.weight.mul_(scale.view(shape))
            bias = -norm.running_mean * scale
            if norm.affine:
                bias = bias + norm.bias
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        block.norm = nn.Identity()
    return fused


def build_generator(config: ModelConfig) -> UNetGenerator:
    return UNetGenerator(config.in_channels, config.out_channels, config.generator_channels,
                         config.depth, config.norm, config.dropout, config.upsample,
                         config.padding)


def build_discriminator(config: ModelConfig) -> PatchDiscriminator:
    conditional = config.discriminator_classes == 0
    return PatchDiscriminator(
        in_channels=config.out_channels + (config.in_channels if conditional else 0),
        base_channels=config.discriminator_channels, num_layers=config.discriminator_layers,
        norm=config.norm, num_classes=config.discriminator_classes)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())

"""What a colour cast, edge stripes, a frame along the border and a grid leave in generated
photos, measured against the real photos of the same label maps (benchmark.quality's artefact
columns)."""

import torch


def artefacts(fake, real, edge_columns=None):
    """What a colour cast, edge stripes and a grid leave in generated photos, against the real
    photos of the same labels ((N, 3, H, W) in [-1, 1]):
      channel_mean / channel_std (0..255, R G B, generated) beside real_channel_mean / _std;
      mean_shift: the largest |difference| of a channel's mean; std_ratio: the smallest
        generated / real spread over the channels (below 1: washed out);
      edge_error_ratio: mean |generated - real| in the outermost columns (W/32 each side, at
        least 2) over the middle half's (stripes along the left and right edges: > 1);
      edge_detail_ratio: the same columns' mean |horizontal difference| (vertical structure)
        over the real photos', divided by that ratio in the middle half (stripes: > 1; an
        error from the border's missing context alone, a blur, leaves it at or below 1);
      grid_power_ratio: the share of spectral power on the 2- and 4-pixel periods (rows and
        columns of the 2D spectrum at H/2, H/4, W/2, W/4) in the generated photos over that in
        the real ones (a grid: > 1);
      border_lines / real_border_lines: lines at fixed places along the border, the same in
        every photo (see `border_lines`), in levels 0..255."""
    fake, real = fake.float(), real.float()
    to_255 = 127.5
    mean_f, mean_r = fake.mean((0, 2, 3)), real.mean((0, 2, 3))
    std_f, std_r = fake.std((0, 2, 3)), real.std((0, 2, 3))
    profile = (fake - real).abs().mean((0, 1, 2))  # (W,) column profile of the error
    width = profile.numel()
    edge = edge_columns or max(2, width // 32)
    edges = torch.cat([profile[:edge], profile[-edge:]]).mean()
    middle = profile[width // 4:width - width // 4].mean()
    detail = [(x[..., 1:] - x[..., :-1]).abs().mean((0, 1, 2)) for x in (fake, real)]
    detail_ratio = detail[0] / detail[1].clamp_min(1e-6)  # (W - 1,) per column boundary
    detail_edges = torch.cat([detail_ratio[:edge], detail_ratio[-edge:]]).mean()
    detail_middle = detail_ratio[width // 4:width - 1 - width // 4].mean()
    return {"channel_mean": [round(v, 1) for v in ((mean_f + 1) * to_255).tolist()],
            "real_channel_mean": [round(v, 1) for v in ((mean_r + 1) * to_255).tolist()],
            "channel_std": [round(v, 1) for v in (std_f * to_255).tolist()],
            "real_channel_std": [round(v, 1) for v in (std_r * to_255).tolist()],
            "mean_shift": ((mean_f - mean_r).abs().max() * to_255).item(),
            "std_ratio": (std_f / std_r.clamp_min(1e-6)).min().item(),
            "edge_error_ratio": (edges / middle.clamp_min(1e-6)).item(),
            "edge_detail_ratio": (detail_edges / detail_middle.clamp_min(1e-6)).item(),
            "grid_power_ratio": grid_share(fake) / max(grid_share(real), 1e-12),
            "border_lines": border_lines(fake), "real_border_lines": border_lines(real)}


def border_lines(photos):
    """How strongly the mean photo of a set ((N, C, H, W) in [-1, 1]) has lines at fixed
    places near its border: the mean |p[i] - (p[i-1] + p[i+1]) / 2| of its column profile p
    (and of its row profile) over the outer W/16 (H/16) places on each side, in levels 0..255.
    What changes from photo to photo averages out; a frame drawn at the same columns and rows
    of every photo (a network's border pattern) stays. Real photos: near 0."""
    def lines(profile):  # (C, L) -> the outer places' mean strength
        bumps = (profile[:, 1:-1] - (profile[:, :-2] + profile[:, 2:]) / 2).abs().mean(0)
        edge = max(2, profile.shape[-1] // 16)
        return torch.cat([bumps[:edge], bumps[-edge:]]).mean()
    photos = photos.float()
    return ((lines(photos.mean((0, 2))) + lines(photos.mean((0, 3)))) / 2 * 127.5).item()


def _grey(photos):
    """(N, C, H, W) -> (N, H, W): each photo's grey, its mean removed (what a spectrum reads)."""
    grey = photos.float().mean(1)
    return grey - grey.mean((-2, -1), keepdim=True)


def grid_share(photos):
    """Share of the (mean-removed, grey) photos' spectral power on the 2- and 4-pixel periods."""
    grey = _grey(photos)
    power = torch.fft.fft2(grey).abs().square().mean(0)  # (H, W)
    h, w = power.shape
    on_grid = torch.zeros_like(power, dtype=torch.bool)
    for period in (2, 4):
        if h % period == 0:
            on_grid[h // period] = on_grid[-(h // period)] = True
        if w % period == 0:
            on_grid[:, w // period] = on_grid[:, -(w // period)] = True
    return (power[on_grid].sum() / power.sum().clamp_min(1e-12)).item()


def period_power_ratios(fake, real):
    """The generated photos' horizontal power spectrum over the real photos', by period in
    pixels ({period: ratio}, periods W/k for k = 1..W/2). Each set's spectrum: the grey,
    mean-removed rows' power by frequency, averaged over rows and photos, as a share of its
    total. A grid at a fixed period shows as a peak over the neighbouring periods."""
    def spectrum(photos):
        power = torch.fft.rfft(_grey(photos), dim=-1).abs().square().mean((0, 1))  # (W // 2 + 1,)
        return power / power.sum().clamp_min(1e-12)
    ratio = spectrum(fake) / spectrum(real).clamp_min(1e-12)
    width = fake.shape[-1]
    return {width / k: ratio[k].item() for k in range(1, width // 2 + 1)}

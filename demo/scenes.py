"""Deterministic synthetic street scenes, drawn from scratch (no Cityscapes pixels): a label map
in the exact Cityscapes palette and a "photo" of the same layout, with textures, shading and
noise that a per-class colour lookup cannot reproduce but a conv net can partly learn
(demo/data.py writes them to disk). Geometry is in image units (0..1, y down), so every size
draws the same scene: the ground is a plane seen from a car, its lines meeting at a vanishing
point on the horizon, and an object standing at ground row y has a scale proportional to its
depth (0 at the horizon, 1 at the bottom row)."""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cityscapes import COLORS, PALETTE

CLASS_INDEX = {name: index for index, name in enumerate(COLORS)}
MIN_SIZE = 32
ROAD_WIDTH_M = 8.0  # two lanes; sets the metres -> image units scale at every depth

FACADE_TINTS = np.array([[1, 1, 1], [1, .92, .8], [.95, .7, .58], [.85, .9, 1], [1, .97, .86]])
CAR_PAINTS = np.array([[205, 205, 210], [235, 235, 232], [28, 28, 32], [150, 22, 28],
                       [32, 52, 120], [70, 72, 76], [120, 125, 90]])
SKIN_TONES = np.array([[240, 200, 170], [215, 165, 130], [175, 120, 85], [120, 80, 55]])
SIGN_STYLES = [([235, 235, 235], [200, 25, 30]), ([30, 70, 165], [235, 235, 235]),
               ([235, 190, 30], [25, 25, 25])]  # (face, rim) of round, square, diamond signs


# ---------------------------------------------------------------- canvas and geometry
@dataclass(frozen=True)
class _Street:
    horizon: float  # row of the horizon
    vanish_x: float  # column of the vanishing point
    road: tuple  # x of the road's (left, right) edges on the bottom row
    walk: tuple  # x of the sidewalks' (left, right) outer edges on the bottom row

    def depth(self, y):
        return np.maximum((y - self.horizon) / (1 - self.horizon), 0)

    def ground_y(self, depth):
        return self.horizon + depth * (1 - self.horizon)

    def line_x(self, bottom_x, y):
        """x where the ground line from the vanishing point to (bottom_x, 1) crosses row y."""
        return self.vanish_x + (bottom_x - self.vanish_x) * self.depth(y)

    def ground_row(self, bottom_x, x):
        """Row where that ground line passes column x (the inverse of line_x)."""
        return self.ground_y(np.maximum((x - self.vanish_x) / (bottom_x - self.vanish_x), 0))

    def metres(self, depth):
        return (self.road[1] - self.road[0]) * depth / ROAD_WIDTH_M

    def edges(self, y):
        """x of the left sidewalk's outer edge, the road's edges and the right sidewalk's, at y."""
        return [self.line_x(x, y) for x in (self.walk[0], *self.road, self.walk[1])]


@dataclass
class _Canvas:
    classes: np.ndarray  # (H, W) uint8 index into PALETTE
    photo: np.ndarray  # (H, W, 3) float32, clipped to 0..255 only at the end
    coarse: np.ndarray  # (H, W) smooth noise, about -1..1: clouds, blotches
    fine: np.ndarray  # (H, W) high-frequency noise, about -1..1: surface textures
    coords: np.ndarray  # (H,) pixel centres in 0..1


class _Window(NamedTuple):
    rows: slice
    cols: slice
    y: np.ndarray  # (h, 1) pixel-centre rows
    x: np.ndarray  # (1, w) pixel-centre columns
    coarse: np.ndarray  # (h, w) views of the canvas noise
    fine: np.ndarray


def _value_noise(rng, size, cells):
    """Smooth noise in -1..1: random values on a (cells+1)^2 grid, smoothstep-interpolated."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32) * 2 - 1
    pos = np.arange(size, dtype=np.float32) * (cells / size)
    index = pos.astype(np.int64)
    t = pos - index
    t = t * t * (3 - 2 * t)
    rows = grid[index] * (1 - t)[:, None] + grid[index + 1] * t[:, None]  # (size, cells + 1)
    return rows[:, index] * (1 - t) + rows[:, index + 1] * t


def _fractal_noise(rng, size, cells, gain):
    octaves = [(_value_noise(rng, size, min(c, size // 2)), 0.6**k) for k, c in enumerate(cells)]
    return gain * sum(noise * weight for noise, weight in octaves) / sum(w for _, w in octaves)


def _window(canvas, x0, x1, y0, y1):
    """The pixels whose centres may fall in [x0, x1) x [y0, y1), or None if there are none."""
    n = len(canvas.coords)
    c0, c1 = max(int(np.floor(x0 * n)), 0), min(int(np.ceil(x1 * n)), n)
    r0, r1 = max(int(np.floor(y0 * n)), 0), min(int(np.ceil(y1 * n)), n)
    if c0 >= c1 or r0 >= r1:
        return None
    rows, cols = slice(r0, r1), slice(c0, c1)
    return _Window(rows, cols, canvas.coords[rows, None], canvas.coords[None, cols],
                   canvas.coarse[rows, cols], canvas.fine[rows, cols])


def _paint(canvas, win, mask, name, rgb):
    """Set class `name` and photo colour `rgb` (anything broadcastable to (h, w, 3)) on mask."""
    mask = np.broadcast_to(mask, win.fine.shape)
    canvas.classes[win.rows, win.cols][mask] = CLASS_INDEX[name]
    np.copyto(canvas.photo[win.rows, win.cols], rgb, where=mask[..., None])


def _random_street(rng):
    horizon, vanish_x = rng.uniform(0.36, 0.55), rng.uniform(0.38, 0.62)
    centre, half = vanish_x + rng.uniform(-0.12, 0.12), rng.uniform(0.3, 0.55)
    left, right = centre - half, centre + half
    walk = (left - rng.uniform(0.15, 0.45), right + rng.uniform(0.15, 0.45))
    return _Street(horizon, vanish_x, (left, right), walk)


# ---------------------------------------------------------------- background: sky, ground, facades
def _draw_sky(canvas, street, rng):
    t = np.clip(canvas.coords[:, None, None] / street.horizon, 0, 1) ** 1.5  # 1 at the horizon
    sky = (rng.uniform([50, 95, 165], [65, 115, 190]) * (1 - t)
           + rng.uniform([185, 200, 218], [205, 218, 235]) * t)
    threshold = rng.uniform(0.2, 0.9)  # high threshold: a clear day
    cloud = np.clip((canvas.coarse - threshold) * 2.5, 0, 1)[..., None] * (1 - 0.5 * t)
    white = rng.uniform(215, 245) + 12 * canvas.fine[..., None]
    canvas.photo[:] = sky * (1 - cloud) + white * cloud


def _asphalt(win, street, rng):
    depth = np.maximum(street.depth(win.y), 1e-3)
    value = rng.uniform(92, 108) * (1.2 - 0.5 * depth) + 9 * win.fine  # darker toward the bottom
    centre = street.line_x(sum(street.road) / 2, win.y)
    dashes = (rng.uniform(0.6, 1.3) / depth + rng.random()) % 1 < 0.45  # ground distance ~ 1/depth
    line = np.abs(win.x - centre) < np.maximum(0.07 * street.metres(depth), 0.4 / len(win.fine))
    value = np.where(line & dashes & (depth > 0.03), 205 + 10 * win.fine, value)
    return value[..., None] * rng.uniform(0.95, 1.05, 3)


def _tiles(win, street, rng):
    depth = np.maximum(street.depth(win.y), 1e-3)
    walk_l, road_l, road_r, walk_r = street.edges(win.y)
    across = np.where(win.x < street.vanish_x, (road_l - win.x) / (road_l - walk_l + 1e-6),
                      (win.x - road_r) / (walk_r - road_r + 1e-6))  # 0 at the kerb
    grout = ((across * rng.integers(3, 8)) % 1 < 0.07) | ((rng.uniform(2, 5) / depth) % 1 < 0.08)
    value = rng.uniform(150, 172) * (1 + 0.08 * win.coarse) + 6 * win.fine
    value = np.where(grout, 0.75 * value, value) * np.where(across < 0.06, 1.15, 1.0)
    return value[..., None] * rng.uniform([0.95, 0.93, 0.88], [1.05, 1.02, 1.0])


def _foliage(win, rng, underside):
    """Leafy multi-scale texture; `underside` (h, w) in 0..1 darkens toward the bottom."""
    leaf = np.clip(0.55 + 0.9 * win.fine + 0.35 * win.coarse, 0, 1.3)
    shade = (0.45 + 0.7 * leaf) * (1 - 0.35 * underside)
    return rng.uniform([45, 85, 22], [65, 105, 38]) * shade[..., None]


def _draw_ground(canvas, street, sides, rng):
    win = _window(canvas, 0, 1, street.horizon, 1)
    walk_l, road_l, road_r, walk_r = street.edges(win.y)
    tiles = _tiles(win, street, rng)
    blotches = 1 + 0.15 * win.coarse + 0.12 * win.fine
    grass = rng.uniform([100, 135, 55], [120, 150, 68]) * blotches[..., None]
    for side, beyond in enumerate(((win.x < walk_l), (win.x >= walk_r))):
        # Beside buildings the pavement goes on under them and shows in the gaps.
        name, rgb = ("terrain", grass) if sides[side] == "park" else ("sidewalk", tiles)
        _paint(canvas, win, beyond, name, rgb)
    walks = ((win.x >= walk_l) & (win.x < road_l)) | ((win.x >= road_r) & (win.x < walk_r))
    _paint(canvas, win, walks, "sidewalk", tiles)
    _paint(canvas, win, (win.x >= road_l) & (win.x < road_r), "road", _asphalt(win, street, rng))


def _draw_building(canvas, street, side, x0, x1, light, rng):
    low, tall = rng.uniform(0.01, 0.08), rng.uniform(0.4, 2.5)
    bottom_near = street.ground_row(street.walk[side], x0 if side == 0 else x1)
    top_near = street.horizon - low - tall * (bottom_near - street.horizon)
    win = _window(canvas, x0, x1, top_near, bottom_near)
    if win is None:
        return
    bottom = street.ground_row(street.walk[side], win.x)
    top = street.horizon - low - tall * (bottom - street.horizon)  # roofline meets the vanish point
    v = np.clip((win.y - top) / (bottom - top), 0, 1)  # 0 at the roof, 1 at the ground
    u = np.clip((win.x - x0) / (x1 - x0), 0, 0.999)
    floors, columns = rng.integers(3, 11), rng.integers(2, 9)
    base = rng.uniform(125, 185) * FACADE_TINTS[rng.integers(len(FACADE_TINTS))] * light
    facade = base * (1 - 0.45 * v)[..., None] + 7 * win.fine[..., None]
    # Windows sit on a grid fixed to the facade's edges; each pane has its own reflection.
    cell_u, cell_v = u * columns, v * floors
    panes = ((cell_u % 1 > 0.22) & (cell_u % 1 < 0.78) & (cell_v % 1 > 0.25) & (cell_v % 1 < 0.72)
             & (v < 1 - 1 / floors))
    shine = rng.random((floors + 1, columns + 1))[cell_v.astype(int), cell_u.astype(int)]
    glass = rng.uniform([25, 35, 45], [60, 70, 85]) + (70 * shine * (1.1 - v))[..., None]
    mask = (win.y >= top) & (win.y < bottom) & (win.x >= x0) & (win.x < x1)
    _paint(canvas, win, mask, "building", np.where(panes[..., None], glass, facade))


def _draw_buildings(canvas, street, side, light, rng):
    step, x = (-1 if side == 0 else 1), street.vanish_x
    while 0 <= x <= 1:  # widths grow away from the vanishing point, as in perspective
        width = (0.015 + 0.3 * abs(x - street.vanish_x)) * rng.uniform(0.6, 1.5)
        x0, x1 = min(x, x + step * width), max(x, x + step * width)
        if rng.random() < 0.9:
            _draw_building(canvas, street, side, x0, x1, light, rng)
        else:  # a gap between buildings, filled with trees
            _draw_band(canvas, street, "vegetation", x0, x1, street.walk[side],
                       rng.uniform(0.03, 0.1), rng.uniform(1.4, 2.4), rng)
        x += step * width


def _draw_band(canvas, street, name, x0, x1, bottom_x, low, rise, rng):
    """Trees, a hedge or a fence on the ground line through bottom_x, between columns x0 and x1.

    Its height is low + rise * (distance below the horizon); with low = 0 that is constant in
    metres, so rise = height_m * street.metres(1) / (1 - street.horizon).
    """
    win = _window(canvas, x0, x1, 0, 1)
    if win is None:
        return
    bottom = street.ground_row(bottom_x, win.x)
    top = bottom - low - rise * (bottom - street.horizon)
    if name == "vegetation":  # bumpy crowns
        top = top + 0.12 * (bottom - top) * (win.coarse[:1] + 0.4 * win.fine[:1])
    v = np.clip((win.y - top) / (bottom - top + 1e-6), 0, 1)
    if name == "vegetation":
        rgb = _foliage(win, rng, v)
    else:  # fence posts repeat in ground distance, like the lane dashes
        posts = (rng.uniform(3, 6) / np.maximum(street.depth(bottom), 1e-3)) % 1 < 0.25
        rgb = rng.uniform(80, 170, 3) * np.where(posts | (v < 0.1), 1.0, 0.6)[..., None]
    _paint(canvas, win, (win.y >= top) & (win.y < bottom) & (win.x >= x0) & (win.x < x1), name, rgb)


def _draw_side(canvas, street, side, park, light, rng):
    """Buildings, sometimes with a hedge, or a park: a tree line behind grass, maybe a fence."""
    span = ((0, street.vanish_x), (street.vanish_x, 1))[side]
    if park:
        far = street.walk[side] + (-1 if side == 0 else 1) * rng.uniform(0.1, 0.6)
        _draw_band(canvas, street, "vegetation", *span, far, rng.uniform(0.03, 0.1),
                   rng.uniform(1.4, 2.4), rng)
    else:
        _draw_buildings(canvas, street, side, light, rng)
    if rng.random() < 0.4:
        name, height_m = ("fence", 1.3) if park else ("vegetation", 1.1)
        rise = height_m * rng.uniform(0.75, 1.25) * street.metres(1) / (1 - street.horizon)
        _draw_band(canvas, street, name, *np.sort(rng.uniform(*span, 2)), street.walk[side], 0,
                   rise, rng)


# ---------------------------------------------------------------- objects standing on the ground
def _draw_car(canvas, street, s, x, rng):
    m, ground = street.metres(s), street.ground_y(s)
    width, height = 1.8 * m * rng.uniform(0.95, 1.1), 1.45 * m * rng.uniform(0.9, 1.15)
    shadow = _window(canvas, x - 0.55 * width, x + 0.55 * width, ground - 0.1 * height,
                     ground + 0.06 * height)
    if shadow is not None:  # darkens the asphalt only: invisible in the label map
        on_road = canvas.classes[shadow.rows, shadow.cols] == CLASS_INDEX["road"]
        canvas.photo[shadow.rows, shadow.cols][on_road] *= 0.55
    win = _window(canvas, x - width / 2, x + width / 2, ground - height, ground)
    if win is None:
        return
    u, v = (win.x - x) / width + 0.5, (win.y - ground) / height + 1  # 0..1 across, top to bottom
    inset = 0.08 + 0.1 * (1 - v / 0.42)  # the cabin narrows toward the roof
    cabin = (v < 0.42) & (u > inset) & (u < 1 - inset)
    wheels = (v >= 0.78) & (((u > 0.05) & (u < 0.24)) | ((u > 0.76) & (u < 0.95)))
    paint = CAR_PAINTS[rng.integers(len(CAR_PAINTS))]
    if rng.random() < 0.3:
        paint = rng.uniform(20, 230, 3)
    rgb = paint * np.clip(1.25 - 0.6 * v, 0.5, 1.2)[..., None] + 5 * win.fine[..., None]
    glass = cabin & (v > 0.07) & (u > inset + 0.05) & (u < 0.95 - inset)
    rgb = np.where(glass[..., None], rng.uniform(25, 55) + (40 * (0.42 - v))[..., None], rgb)
    lights = (v > 0.47) & (v < 0.58) & ((u < 0.17) | (u > 0.83))
    rgb = np.where(lights[..., None], np.array([200.0, 30, 30]), rgb)
    rgb = np.where((wheels | ((v > 0.8) & (v < 0.86)))[..., None], 22.0, rgb)  # tyres, bumper
    _paint(canvas, win, cabin | ((v >= 0.38) & (v < 0.86)) | wheels, "car", rgb)


def _draw_person(canvas, street, s, x, rng):
    height, ground = rng.uniform(1.55, 1.9) * street.metres(s), street.ground_y(s)
    win = _window(canvas, x - 0.2 * height, x + 0.2 * height, ground - height, ground)
    if win is None:
        return
    u, v = (win.x - x) / height, (win.y - ground) / height + 1  # v: 0 at the top of the head
    head = (u / 0.065) ** 2 + ((v - 0.075) / 0.08) ** 2 < 1
    torso = (v >= 0.15) & (v < 0.54) & (np.abs(u) < np.where(v < 0.19, 0.1, 0.13))
    stride = rng.uniform(0, 0.12) * (v - 0.5)  # feet apart when walking
    legs = (v >= 0.5) & ((np.abs(u + 0.05 + stride) < 0.045) | (np.abs(u - 0.05 - stride) < 0.045))
    shirt, trousers = rng.uniform(20, 230, 3), rng.uniform(15, 120, 3) * rng.uniform(0.6, 1.0, 3)
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.05)
    rgb = np.where(legs[..., None], trousers, shirt) * (1.1 - 0.3 * np.clip(v, 0, 1))[..., None]
    rgb = np.where(head[..., None], np.where((v < 0.04)[..., None], rng.uniform(20, 90), skin), rgb)
    _paint(canvas, win, head | torso | legs, "person", rgb)


def _draw_sign(canvas, x, y, radius, rng):
    win = _window(canvas, x - radius, x + radius, y - radius, y + radius)
    if win is None:
        return
    du, dv = np.abs(win.x - x) / radius, (win.y - y) / radius
    shape = rng.integers(len(SIGN_STYLES))
    r = (np.hypot(du, dv), np.maximum(du, np.abs(dv)), du + np.abs(dv))[shape]  # 1 on the outline
    face, rim = SIGN_STYLES[shape]
    rgb = np.where((r > 0.75)[..., None], np.array(rim, float), face) * (1 - 0.08 * dv)[..., None]
    _paint(canvas, win, r < 1, "traffic sign", rgb)


def _draw_pole(canvas, street, s, x, rng):
    m, ground = street.metres(s), street.ground_y(s)
    height, half = rng.uniform(4.5, 8) * m, max(0.09 * m, 0.5 / len(canvas.coords))
    win = _window(canvas, x - half, x + half, ground - height, ground)
    if win is None:
        return
    u = (win.x - x) / (2 * half) + 0.5
    shade = np.clip(0.45 + 0.65 * np.cos(np.pi * (u - 0.35)), 0.25, 1.1)  # lit like a cylinder
    metal = rng.uniform(70, 170) * rng.uniform([0.9, 0.95, 0.9], [1.0, 1.05, 1.0])
    _paint(canvas, win, (win.x >= x - half) & (win.x < x + half), "pole", shade[..., None] * metal)
    if rng.random() < 0.7:
        radius = max(0.38 * m, 1.0 / len(canvas.coords))
        _draw_sign(canvas, x, ground - height + radius, radius, rng)


def _draw_tree(canvas, street, s, x, rng):
    m, ground = street.metres(s), street.ground_y(s)
    trunk_top, radius = ground - rng.uniform(2.5, 4) * m, rng.uniform(1.5, 3) * m
    half = max(0.18 * m, 0.5 / len(canvas.coords))
    win = _window(canvas, x - 1.8 * radius, x + 1.8 * radius, trunk_top - 2.2 * radius, ground)
    if win is None:
        return
    bark = (rng.uniform([70, 50, 30], [110, 80, 55])
            * np.clip(1.1 - 0.4 * (win.x - x + half) / (2 * half), 0.5, 1.1)[..., None])
    trunk = (np.abs(win.x - x) < half) & (win.y >= trunk_top - radius)
    _paint(canvas, win, trunk, "vegetation", bark)
    crown, centre_y = np.zeros(win.fine.shape, dtype=bool), trunk_top - radius
    for dx, dy, r in rng.uniform([-0.6, -0.6, 0.5], [0.6, 0.5, 0.9], (4, 3)) * radius:
        crown |= ((win.x - x - dx) / r) ** 2 + ((win.y - centre_y - dy) / (0.9 * r)) ** 2 < 1
    underside = np.clip((win.y - trunk_top + 2 * radius) / (2 * radius), 0, 1)
    _paint(canvas, win, crown, "vegetation", _foliage(win, rng, underside))


_DRAWERS = {"car": _draw_car, "person": _draw_person, "pole": _draw_pole, "tree": _draw_tree}


def _spot(street, rng, edges, across):
    """(depth, x) of a ground point between two bottom-row edges that stays in the picture."""
    bottom_x = edges[0] + (edges[1] - edges[0]) * across
    s_max = 1.0
    for limit in (0.03, 0.97):  # the ground line leaves the picture where it crosses a limit
        if (bottom_x - limit) * (street.vanish_x - limit) < 0:
            s_max = min(s_max, (street.vanish_x - limit) / (street.vanish_x - bottom_x))
    s = rng.uniform(0.1, max(s_max, 0.11))
    return s, float(street.line_x(bottom_x, street.ground_y(s)))


def _scatter_objects(street, sides, rng, busy):
    objects, more = [], lambda high: 1 + round((high - 1) * busy)  # busy scales the counts
    first_tree = 0 if "park" in sides else 1
    for _ in range(rng.integers(1, more(5))):  # cars keep to a lane
        lane = rng.choice([0.25, 0.75]) + rng.uniform(-0.05, 0.05)
        objects.append(("car", *_spot(street, rng, street.road, lane)))
    walks = ((street.road[0], street.walk[0]), (street.road[1], street.walk[1]))
    for kind, count, across in (("person", rng.integers(1, more(6)), (0.2, 0.9)),
                                ("pole", rng.integers(1, more(4)), (0.05, 0.2)),
                                ("tree", rng.integers(first_tree, more(5)), (0.6, 0.9))):
        for _ in range(count):
            walk = walks[rng.integers(2)]
            objects.append((kind, *_spot(street, rng, walk, rng.uniform(*across))))
    return sorted(objects, key=lambda o: o[1])  # far to near, so near objects cover far ones


# ---------------------------------------------------------------- public: scenes
def make_scene(rng: np.random.Generator, size: int = 256,
               busy: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One random street scene: (label, photo), both uint8 (size, size, 3); the label in exact
    Cityscapes colours, the photo rendered from the same layout; `busy` scales the objects."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    canvas = _Canvas(np.full((size, size), CLASS_INDEX["sky"], dtype=np.uint8),
                     np.zeros((size, size, 3), dtype=np.float32),
                     _fractal_noise(rng, size, (3, 6, 12), 1.6),
                     _fractal_noise(rng, size, (32, 64, 128), 2.0), coords)
    street = _random_street(rng)
    sides = ["buildings" if rng.random() < 0.75 else "park" for _ in range(2)]
    # The sun is always on the left: the right-hand facades are in shade. A lookup table
    # cannot know which side a building is on; a network that sees the road can.
    lights = (1.0, rng.uniform(0.6, 0.7))
    _draw_sky(canvas, street, rng)
    _draw_ground(canvas, street, sides, rng)
    for side in (0, 1):
        _draw_side(canvas, street, side, sides[side] == "park", lights[side], rng)
    for kind, s, x in _scatter_objects(street, sides, rng, busy):
        _DRAWERS[kind](canvas, street, s, x, rng)
    return PALETTE[canvas.classes], _finish_photo(canvas, rng)


def _finish_photo(canvas, rng):
    """Global lighting gradient, white balance and sensor noise, then 8 bits."""
    y, x = canvas.coords[:, None], canvas.coords[None, :]
    light = 1 + rng.uniform(-0.06, 0.06) * (x - 0.5) + rng.uniform(-0.06, 0.06) * (y - 0.5)
    tint = rng.uniform(0.96, 1.04, 3).astype(np.float32)
    noise = rng.standard_normal(canvas.photo.shape, dtype=np.float32) * rng.uniform(1.5, 4.0)
    return np.clip(np.rint(canvas.photo * light[..., None] * tint + noise), 0, 255).astype(np.uint8)

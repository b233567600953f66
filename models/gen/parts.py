"""Synthetic industrial part images for the demo package.

A light, slightly brushed metal plate with rounded corners and four drilled
holes, photographed on a dark conveyor under varying light. Defects:

* ``scratch``: a thin bright or dark line/arc on the plate surface,
* ``missing_hole``: one of the four holes was never drilled.

Shapes are drawn with signed distance fields so edges are anti-aliased
without supersampling, which keeps rendering cheap enough to make a few
thousand training images in seconds.
"""

from __future__ import annotations

import numpy as np

LABELS = ["ok", "scratch", "missing_hole"]
SIZE = 96


def _coverage(sd: np.ndarray) -> np.ndarray:
    """Pixel coverage of the region sd < 0 (1 px wide linear ramp)."""
    return np.clip(0.5 - sd, 0.0, 1.0)


def _rounded_box_sd(u, v, half, radius):
    qx = np.abs(u) - (half - radius)
    qy = np.abs(v) - (half - radius)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside - radius


def _segment_distance(px, py, ax, ay, bx, by):
    """Distance from every pixel to segment a-b."""
    dx, dy = bx - ax, by - ay
    t = ((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an HxWxC float image (reflect padding)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        for i, kv in enumerate(k):
            sl = [slice(None)] * img.ndim
            sl[axis] = slice(i, i + out.shape[axis])
            acc += kv * p[tuple(sl)]
        out = acc
    return out


def _smooth_noise(rng, cells: int, size: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid bilinearly upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def render(rng: np.random.Generator, label: str) -> np.ndarray:
    """Render one 96x96 RGB uint8 image of the given class."""
    assert label in LABELS
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5

    # --- background: dark conveyor belt with uneven lighting -------------
    bg_level = rng.uniform(35, 75)
    bg_tint = rng.uniform(0.9, 1.1, 3)
    bg = bg_level + 10 * _smooth_noise(rng, 4, SIZE) + rng.normal(0, 3, (SIZE, SIZE))
    img = bg[..., None] * bg_tint

    # --- plate pose ------------------------------------------------------
    cx, cy = SIZE / 2 + rng.uniform(-6, 6, 2)
    half = rng.uniform(27, 32)
    corner = rng.uniform(5, 10)
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    # Plate-local coordinates.
    u = c * (xx - cx) + s * (yy - cy)
    v = -s * (xx - cx) + c * (yy - cy)
    plate_sd = _rounded_box_sd(u, v, half, corner)
    plate = _coverage(plate_sd)

    # --- metal surface: level, shading gradient, faint brushing ----------
    level = rng.uniform(150, 200)
    g = rng.normal(0, 1, 2)
    shade = rng.uniform(5, 20) * (g[0] * u + g[1] * v) / (half * np.hypot(*g) + 1e-9)
    brush_dir = rng.uniform(0, np.pi)
    w = np.cos(brush_dir) * u + np.sin(brush_dir) * v
    brush = rng.uniform(1.0, 3.0) * np.sin(w * rng.uniform(1.5, 3.0) + rng.uniform(0, 6.3)) \
        * _smooth_noise(rng, 6, SIZE)
    surface = level + shade + brush + rng.normal(0, 1.5, (SIZE, SIZE))
    # Slightly darker bevel along the plate edge.
    surface -= rng.uniform(10, 25) * np.clip(1 + plate_sd / 2.0, 0, 1)
    metal_tint = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.03, 0.03, 3)
    surface = surface[..., None] * metal_tint

    # --- defect: scratch on the surface ----------------------------------
    if label == "scratch":
        # Redraw until both ends are on the plate: the plate is convex, so
        # the whole (straight) scratch is then visible on metal.
        while True:
            length = rng.uniform(18, 40)
            ang = rng.uniform(0, 2 * np.pi)
            sx, sy = rng.uniform(-0.8, 0.8, 2) * half
            ex, ey = sx + length * np.cos(ang), sy + length * np.sin(ang)
            if max(abs(ex), abs(ey)) < 0.85 * half:
                break
        if rng.random() < 0.4:
            # Arc: a quadratic Bezier bowed sideways, drawn as short segments.
            bow = rng.uniform(-0.35, 0.35) * length
            mx = (sx + ex) / 2 - bow * np.sin(ang)
            my = (sy + ey) / 2 + bow * np.cos(ang)
            t = np.linspace(0, 1, 12)
            px = (1 - t) ** 2 * sx + 2 * (1 - t) * t * mx + t ** 2 * ex
            py = (1 - t) ** 2 * sy + 2 * (1 - t) * t * my + t ** 2 * ey
        else:
            px, py = np.array([sx, ex]), np.array([sy, ey])
        dist = np.full_like(u, np.inf)
        for i in range(len(px) - 1):
            dist = np.minimum(dist, _segment_distance(u, v, px[i], py[i], px[i + 1], py[i + 1]))
        width = rng.uniform(1.0, 2.0)
        profile = np.clip(width / 2 + 0.5 - dist, 0, 1)
        contrast = rng.uniform(60, 100) * (1 if rng.random() < 0.5 else -1)
        surface += (contrast * profile)[..., None]

    # --- holes (drilled through: the dark belt shows through) ------------
    spacing = half * rng.uniform(0.55, 0.65)
    hole_r = rng.uniform(3.5, 5.0)
    centres = [(sx_ * spacing, sy_ * spacing) for sx_ in (-1, 1) for sy_ in (-1, 1)]
    if label == "missing_hole":
        centres.pop(int(rng.integers(0, 4)))
    holes = np.zeros_like(u)
    rim = np.zeros_like(u)
    for hx, hy in centres:
        jx, jy = rng.normal(0, 0.4, 2)  # drilling tolerance
        d = np.hypot(u - hx - jx, v - hy - jy) - hole_r
        holes = np.maximum(holes, _coverage(d))
        rim = np.maximum(rim, np.clip(1 - np.abs(d + 0.5) / 1.5, 0, 1))
    hole_colour = img * rng.uniform(0.4, 0.7)
    surface = surface - (rng.uniform(15, 35) * rim)[..., None]
    part = surface * (1 - holes[..., None]) + hole_colour * holes[..., None]
    img = img * (1 - plate[..., None]) + part * plate[..., None]

    # --- small dust specks on any part (not defects) ---------------------
    for _ in range(int(rng.integers(0, 4))):
        dx, dy = rng.uniform(4, SIZE - 4, 2)
        speck = np.clip(rng.uniform(0.6, 1.3) - np.hypot(xx - dx, yy - dy), 0, 1)
        img += (rng.uniform(-20, 20) * speck)[..., None]

    # --- camera: gain/offset, vignetting, blur, sensor noise -------------
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.95, 1.05, 3)
    vignette = 1 - rng.uniform(0.0, 0.25) * (((xx - SIZE / 2) ** 2 + (yy - SIZE / 2) ** 2) / (SIZE / 2) ** 2)
    img = img * gain * vignette[..., None] + rng.uniform(-12, 12)
    img = _blur(img, rng.uniform(0.3, 0.8))
    img = img + rng.normal(0, rng.uniform(1.0, 4.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)

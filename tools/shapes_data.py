"""Colour shapes on noisy backgrounds: a small vision task made here, so nothing is downloaded.

Eight classes, each drawn at a random position, size, rotation and pair of colours, with noise
and a distractor blot: disc, square, triangle, ring, plus, stripes, checkerboard, and two bars.
Hard enough that a small network does not reach 100 % at 32x32, so a codec's loss shows. Used by
``tools/build_models.py --only shapes_cnn``; needs numpy alone.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("disc", "square", "triangle", "ring", "plus", "stripes", "checkers", "bars")
SIZE = 32


def _mask(kind: int, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """The shape's pixels, in coordinates (u, v) centred on it and rotated."""
    d = np.hypot(u, v)
    if kind == 0:
        return d < r
    if kind == 1:
        return (np.abs(u) < r * 0.8) & (np.abs(v) < r * 0.8)
    if kind == 2:
        # An equilateral triangle: inside three half-planes.
        inside = np.ones_like(u, dtype=bool)
        for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(angle) + v * np.sin(angle) < r * 0.5
        return inside
    if kind == 3:
        return (d < r) & (d > r * 0.55)
    if kind == 4:
        w = r * 0.3
        return ((np.abs(u) < w) & (np.abs(v) < r)) | ((np.abs(v) < w) & (np.abs(u) < r))
    if kind == 5:
        period = rng.uniform(4.0, 8.0)
        return (np.sin(2 * np.pi * u / period) > 0) & (d < r * 1.4)
    if kind == 6:
        period = rng.uniform(5.0, 9.0)
        return ((np.floor(u / period) + np.floor(v / period)) % 2 == 0) & (d < r * 1.4)
    gap = r * 0.35
    return ((np.abs(v - gap) < r * 0.18) | (np.abs(v + gap) < r * 0.18)) & (np.abs(u) < r)


def make(count: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images, float32 [count, size, size, 3] in [0, 1], and their labels, balanced.

    At another ``size`` every length (the shape, its stripes, the blot) scales with it, so the
    scene is the same one drawn at a finer resolution; ``size=32`` gives the images it always gave.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(count) % len(CLASSES)
    rng.shuffle(y)
    x = np.empty((count, size, size, 3), dtype=np.float32)
    scale = size / SIZE
    rows, cols = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / scale - 0.5
    for i, kind in enumerate(y):
        r = rng.uniform(6.0, 12.0)
        cy, cx = rng.uniform(r * 0.7, SIZE - r * 0.7, size=2)
        angle = rng.uniform(0, np.pi)
        du, dv = cols - cx, rows - cy
        u = du * np.cos(angle) + dv * np.sin(angle)
        v = -du * np.sin(angle) + dv * np.cos(angle)
        mask = _mask(int(kind), u, v, r, rng)
        background = rng.uniform(0.0, 1.0, 3)
        foreground = rng.uniform(0.0, 1.0, 3)
        while np.abs(foreground - background).sum() < 0.6:
            foreground = rng.uniform(0.0, 1.0, 3)
        image = np.where(mask[..., None], foreground, background)
        blot_y, blot_x = rng.uniform(0, SIZE, size=2)
        blot = np.hypot(cols - blot_x, rows - blot_y) < rng.uniform(1.5, 3.5)
        image = np.where(blot[..., None], rng.uniform(0.0, 1.0, 3), image)
        image = image + rng.normal(0.0, rng.uniform(0.05, 0.2), image.shape)
        x[i] = np.clip(image, 0.0, 1.0)
    return x, y.astype(np.int64)

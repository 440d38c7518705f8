"""Save a batch of images as one PNG grid (no TensorFlow, no matplotlib figure)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (clipped) or uint8 images -> uint8."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile ``(N, H, W, C)`` images (C in {1, 3}) into one uint8 ``(rows, cols, C)`` array.

    ``ncol`` defaults to ``ceil(sqrt(N))``; tiles are separated by ``padding`` black pixels.
    """
    images = to_uint8(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 1 or 3), got shape {images.shape}")
    n, h, w, c = images.shape
    ncol = max(1, min(n, ncol or math.ceil(math.sqrt(n))))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_image_grid(
    images: np.ndarray, path: str, ncol: int | None = None, padding: int = 2, scale: int = 1
) -> str:
    """Write ``images`` (float in [0, 1] or uint8, NHWC) as a PNG grid; returns ``path``.

    ``scale`` > 1 enlarges each pixel (nearest neighbour), useful for 16x16 images.
    """

    grid = make_grid(images, ncol=ncol, padding=padding)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path

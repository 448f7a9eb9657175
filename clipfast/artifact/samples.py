"""A built-in, deterministic set of varied images and captions.

Used to measure fidelity at export when the user gives no images, and by the offline demo.
The images are generated, not downloaded: gradients, stripes, noise, shapes, flat colours,
grayscale, at several sizes and aspect ratios, so that resize and crop paths are all exercised.
"""

from __future__ import annotations

import numpy as np

CAPTIONS = [
    "a photo of a cat", "a photo of a dog", "a red car parked on a street",
    "a bowl of fruit on a table", "a mountain landscape at sunset", "a city skyline at night",
    "a person riding a bicycle", "a plate of pasta", "a sailing boat on the sea",
    "a snowy forest", "a close-up of a flower", "an airplane in the sky",
    "a cup of coffee", "a group of people at a concert", "a bird on a branch",
    "a bookshelf full of books", "a black and white striped pattern", "a blue gradient",
    "random colourful noise", "a green circle on a white background",
    "a chessboard", "a diagram with text", "an empty road in the desert", "a bright yellow square",
]

_SIZES = [(224, 224), (480, 640), (640, 480), (97, 301), (333, 111), (1024, 768), (50, 50),
          (300, 300), (257, 513), (720, 1280), (129, 131), (400, 200)]


def sample_images(n: int = 24, seed: int = 0) -> list[np.ndarray]:
    """``n`` generated uint8 arrays, ``(H, W, 3)`` or ``(H, W)`` (every fifth is grayscale)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = _SIZES[i % len(_SIZES)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        kind = i % 6
        if kind == 0:  # diagonal colour gradient
            img = np.stack([xx / w, yy / h, 1 - (xx + yy) / (w + h)], -1) * 255
        elif kind == 1:  # stripes at a random frequency and angle
            f, a = rng.uniform(0.02, 0.3), rng.uniform(0, np.pi)
            s = np.sin(f * (np.cos(a) * xx + np.sin(a) * yy))
            img = np.stack([s, -s, s * 0.5], -1) * 127 + 128
        elif kind == 2:  # smooth noise: upsampled random blocks
            small = rng.uniform(0, 255, size=(max(h // 16, 1), max(w // 16, 1), 3))
            img = np.kron(small, np.ones((16, 16, 1)))[:h, :w]
            if img.shape[:2] != (h, w):
                img = np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1]), (0, 0)), "edge")
        elif kind == 3:  # discs on a flat background
            img = np.ones((h, w, 3)) * rng.uniform(0, 255, size=3)
            for _ in range(5):
                cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, max(h, w) / 3)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
        elif kind == 4:  # checkerboard
            c = max(min(h, w) // 8, 1)
            board = ((yy // c + xx // c) % 2)[..., None]
            img = board * rng.uniform(0, 255, size=3) + (1 - board) * rng.uniform(0, 255, size=3)
        else:  # high-frequency noise
            img = rng.uniform(0, 255, size=(h, w, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        if i % 5 == 4:
            img = img.mean(axis=2).astype(np.uint8)
        out.append(img)
    return out


def sample_captions(n: int = 24) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]

"""Regenerate examples/images/ from scikit-image's bundled sample photos (needs scikit-image)."""

from pathlib import Path

from PIL import Image
from skimage import data

OUT = Path(__file__).parent / "images"

for name in ["astronaut", "chelsea", "coffee", "rocket"]:
    im = Image.fromarray(getattr(data, name)())
    im.thumbnail((512, 512))
    im.save(OUT / f"{name}.jpg", quality=88)

"""Decoding of Omniglot PNGs, shared by the background sets and the one-shot runs.

Both readers must preprocess images identically (a model trained on the background set is
evaluated on the runs), so the single definition lives here.

Resampling choice: Pillow ``LANCZOS``, as in the preprocessing script of the MAML reference
code (``proc_images.py``), so results are comparable with published numbers. The 1-bit
105x105 image is first widened to 8-bit grey, so the filter produces smooth anti-aliased
strokes; Pillow clips the Lanczos ringing to 0..255.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tinymeta._checks import check_int

NATIVE_SIZE = 105
RESAMPLE_NAME = "lanczos"
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS  # Pillow < 9.1 has no Resampling enum


def check_image_size(image_size: int) -> int:
    """Validate and return ``image_size`` (a positive int)."""
    return check_int("image_size", image_size, "omniglot")


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Decode one Omniglot PNG into a ``uint8`` array ``(image_size, image_size)``.

    The result is *ink* intensity: 255 where the stroke is, 0 on the paper. (Omniglot PNGs
    are black strokes on white; inverting makes the background zero, which is what
    convolutional models and zero padding expect.)
    """
    with Image.open(io.BytesIO(data)) as img:
        grey = img.convert("L")  # 1-bit -> 0 (ink) / 255 (paper)
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), resample=_LANCZOS)
    return 255 - np.asarray(grey, dtype=np.uint8)


def ink_to_float(ink: np.ndarray) -> np.ndarray:
    """Convert ``uint8`` ink images ``(N, S, S)`` to ``float32`` ``(N, 1, S, S)`` in [0, 1]."""
    # Divide rather than multiply by 1/255 so that full ink maps to exactly 1.0.
    return ink.astype(np.float32)[:, None, :, :] / np.float32(255.0)

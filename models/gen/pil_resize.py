"""Plain re-implementation of PIL's `Image.resize(size, Image.BILINEAR)` for RGB8.

The demo package's preprocessing contract is "bilinear as PIL does it". This
module spells out exactly what that means so the Rust runtime can reproduce
it bit for bit; `verify.py` checks it against PIL on every sample image.

PIL's bilinear resample is a separable triangle filter:

* scale = in / out; when downscaling the filter is widened by the scale
  (support = 1.0 * max(scale, 1)), i.e. it antialiases instead of sampling
  two neighbours,
* output pixel i is centred on input coordinate (i + 0.5) * scale,
* weights are normalised to sum 1, then converted to fixed point with 22
  fractional bits (rounded half away from zero),
* each pass accumulates in integers starting at 0.5 (1 << 21), shifts
  right by 22 and clamps to 0..255,
* the horizontal pass runs first and its result is stored as u8, then the
  vertical pass runs on that intermediate image.
"""

from __future__ import annotations

import numpy as np

PRECISION_BITS = 22


def _coefficients(n_in: int, n_out: int) -> "list[tuple[int, list[int]]]":
    """Per output index: first input index and its fixed-point weights."""
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support = 1.0 * filter_scale
    result = []
    for i in range(n_out):
        centre = (i + 0.5) * scale
        # int() truncates toward zero like the C cast in PIL.
        first = max(int(centre - support + 0.5), 0)
        count = min(int(centre + support + 0.5), n_in) - first
        weights = [max(0.0, 1.0 - abs((first + k - centre + 0.5) / filter_scale)) for k in range(count)]
        total = sum(weights)
        weights = [w / total for w in weights]
        fixed = [int(w * (1 << PRECISION_BITS) + (0.5 if w >= 0 else -0.5)) for w in weights]
        result.append((first, fixed))
    return result


def _pass(src: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Resample a (H, W, C) int64 image along `axis` (1: horizontal, 0: vertical)."""
    src = np.moveaxis(src, axis, 0)
    out = np.empty((n_out,) + src.shape[1:], dtype=np.int64)
    for i, (first, fixed) in enumerate(_coefficients(src.shape[0], n_out)):
        acc = np.full(src.shape[1:], 1 << (PRECISION_BITS - 1), dtype=np.int64)
        for k, w in enumerate(fixed):
            acc += src[first + k] * w
        out[i] = np.clip(acc >> PRECISION_BITS, 0, 255)
    return np.moveaxis(out, 0, axis)


def resize_bilinear(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8, identical to PIL BILINEAR."""
    img = rgb.astype(np.int64)
    if img.shape[1] != width:
        img = _pass(img, width, axis=1)
    if img.shape[0] != height:
        img = _pass(img, height, axis=0)
    return img.astype(np.uint8)

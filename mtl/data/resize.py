"""Deterministic resizing of an image and its per-pixel label maps to a fixed ``size=(H, W)``.

:class:`Resize` maps one example (image ``[h, w, C]`` plus label maps of the same ``h x w``)
to ``H x W`` in numpy, with no randomness (so batches stay a pure function of the indices):

1. window (``fit``): ``"stretch"`` uses the whole image (aspect ratio not kept);
   ``"crop"`` the largest centred window with the target's aspect ratio ``W / H``
   (height ``min(h, round(w * H / W))``, width ``min(w, round(h * W / H))``, offsets
   ``(h - height) // 2`` and ``(w - width) // 2``), so nothing is distorted;
2. the window is resized to ``H x W``:

   * images (``image``): ``"bilinear"`` (half-pixel centres, edge pixels repeated: output pixel
     ``i`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5``, i.e. ``tf.image.resize``
     without antialiasing; a 2x downsample averages 2x2 blocks) or ``"area"`` (box filter,
     :func:`mtl.data.multifashion.area_resize_matrix`; better for large downsampling);
   * label maps (segmentation ids, edge maps): nearest neighbour, the input pixel
     ``floor((i + 0.5) * n_in / n_out)`` (ids are never mixed; the ignore id survives);
   * float maps (``depth``, NaN = invalid pixel): ``"nearest"`` (default: no depth is invented
     across an object boundary, an invalid pixel stays invalid) or ``"bilinear"``: masked
     bilinear, the bilinear weights of the valid input pixels renormalised to sum to 1, NaN
     where none of the (up to 4) input pixels is valid.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

FITS = ("stretch", "crop")
IMAGE_METHODS = ("bilinear", "area")
FLOAT_METHODS = ("nearest", "bilinear")


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """int [n_out]: the input pixel ``floor((i + 0.5) * n_in / n_out)`` of each output pixel."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def bilinear_taps(n_in: int, n_out: int):
    """``(lo, hi, frac)`` [n_out]: output pixel ``i`` = ``(1 - frac) * x[lo] + frac * x[hi]``
    (half-pixel centres, clamped at the borders)."""
    u = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (u - lo).astype(np.float32)


def _bilinear(x: np.ndarray, size) -> np.ndarray:
    """float32 [H, W, C] from [h, w, C] (separable: rows, then columns)."""
    (r0, r1, fr), (c0, c1, fc) = bilinear_taps(x.shape[0], size[0]), bilinear_taps(x.shape[1], size[1])
    x = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    return x[:, c0] * (1 - fc)[None, :, None] + x[:, c1] * fc[None, :, None]


def _area(x: np.ndarray, size) -> np.ndarray:
    from mtl.data.multifashion import area_resize_matrix

    a, b = area_resize_matrix(x.shape[0], size[0]), area_resize_matrix(x.shape[1], size[1])
    h, w, c = x.shape
    rows = (a @ x.reshape(h, w * c)).reshape(size[0], w, c)            # [H, w, C]
    cols = b @ rows.transpose(1, 0, 2).reshape(w, size[0] * c)          # [W, H * C]
    return cols.reshape(size[1], size[0], c).transpose(1, 0, 2).astype(np.float32)


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"Resize {name} must be one of {options}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Resize:
    """Resize one example to ``size = (H, W)`` (see the module docstring)."""

    size: tuple
    fit: str = "stretch"       # stretch | crop
    image: str = "bilinear"    # bilinear | area
    depth: str = "nearest"     # float maps: nearest | bilinear (masked)

    def __post_init__(self):
        size = tuple(self.size) if isinstance(self.size, Sequence) and not isinstance(self.size, str) else ()
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                                 for s in size):
            raise ValueError(f"Resize size must be (height, width) of two integers >= 1, got {self.size!r}")
        object.__setattr__(self, "size", tuple(int(s) for s in size))
        _choice("fit", self.fit, FITS)
        _choice("image", self.image, IMAGE_METHODS)
        _choice("depth", self.depth, FLOAT_METHODS)

    @classmethod
    def of(cls, spec) -> "Resize | None":
        """``None``, a :class:`Resize`, a ``(H, W)`` pair or a mapping of its fields."""
        if spec is None or isinstance(spec, cls):
            return spec
        if hasattr(spec, "items"):
            spec = dict(spec.items())
            unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"Resize got unknown options {unknown}; it takes size, fit, image, depth")
            return cls(**spec)
        return cls(size=spec)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def window(self, hw) -> tuple:
        """``(row, col, height, width)`` of the input window that becomes the output."""
        h, w = (int(s) for s in hw)
        if self.fit == "stretch":
            return 0, 0, h, w
        H, W = self.size
        ch, cw = min(h, max(1, round(w * H / W))), min(w, max(1, round(h * W / H)))
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def _crop(self, x, window):
        r, c, h, w = window
        return x[r:r + h, c:c + w]

    def apply_image(self, x: np.ndarray, window) -> np.ndarray:
        """float32 [H, W, C] from an image [h, w, C] (cast to float32 first)."""
        x = self._crop(np.asarray(x, np.float32), window)
        return _bilinear(x, self.size) if self.image == "bilinear" else _area(x, self.size)

    def apply_labels(self, y: np.ndarray, window) -> np.ndarray:
        """Nearest-neighbour resize of a map [h, w, ...] (dtype kept)."""
        y = self._crop(np.asarray(y), window)
        return y[nearest_index(y.shape[0], self.size[0])][:, nearest_index(y.shape[1], self.size[1])]

    def apply_values(self, y: np.ndarray, window) -> np.ndarray:
        """float32 [H, W, C] from a float map [h, w, C] whose NaN entries are invalid
        (``depth`` method: nearest, or masked bilinear)."""
        if self.depth == "nearest":
            return np.asarray(self.apply_labels(y, window), np.float32)
        y = self._crop(np.asarray(y, np.float32), window)
        valid = np.isfinite(y)
        num = _bilinear(np.where(valid, y, 0.0), self.size)
        den = _bilinear(valid.astype(np.float32), self.size)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 1e-6, num / np.where(den > 1e-6, den, 1.0), np.nan).astype(np.float32)


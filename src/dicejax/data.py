"""Datasets, partitions over nodes and per-node batch streams (host-side numpy).

This module prepares data for the simulator; it imports nothing else from ``dicejax`` and
never downloads anything. Everything here is a pure function of its arguments (and, for the
loaders, of the files they read).

* Datasets: :func:`load_digits` (scikit-learn's bundled 8x8 digits), :func:`load_mnist`,
  :func:`load_fashion_mnist` (IDX files, optionally gzipped), :func:`load_cifar10` (the
  python pickle batches), :func:`load_npz` (your own arrays in one ``.npz`` file), dispatched
  by :func:`load_dataset`. Images come back as
  ``[N, H, W, C]`` float32, normalised per channel with statistics of the train split.
* Partitions: :func:`partition_iid`, :func:`partition_dirichlet`, :func:`partition_shards`
  (dispatched by :func:`partition`) return one int64 index array into the train set per node.
* Batch streams: :func:`node_batches` returns ``{'x': [T, n, B, H, W, C], 'y': [T, n, B]}``,
  the layout ``dicejax.simulate`` consumes; :func:`batch_chunks` yields the same stream in
  pieces along ``T``.
* Evaluation: :func:`probe_set` (the DICE paper's fixed probe batch ``z'``) and :func:`test_set`.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "FASHION_MNIST_DIR",
    "NPZ_PREFIX",
    "Dataset",
    "Stream",
    "batch_chunks",
    "check_stream",
    "gather_batches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_npz",
    "node_batches",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "probe_set",
    "read_idx",
    "stream_indices",
    "test_set",
    "write_idx",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs its (gzipped) IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------


class Dataset(NamedTuple):
    """An image-classification dataset with a train and a test split.

    Attributes:
        x_train: ``[N, H, W, C]`` float32 images, normalised per channel to mean 0 / std 1
            with statistics computed on the train split.
        y_train: ``[N]`` int32 labels in ``[0, num_classes)``.
        x_test: ``[M, H, W, C]`` float32 images, normalised with the *train* statistics.
        y_test: ``[M]`` int32 labels.
        num_classes: number of classes ``C_out``.
        name: short dataset name (``'digits'``, ``'mnist'``, ``'fashion_mnist'``, ``'cifar10'``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, C)`` of one image."""
        h, w, c = self.x_train.shape[1:]
        return (int(h), int(w), int(c))


def _make_dataset(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    name: str,
) -> Dataset:
    """Normalise raw ``[N, H, W, C]`` images per channel with train statistics and pack them."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 4:
            raise ValueError(f"{name}: {split} images must be [N, H, W, C], got shape {x.shape}")
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"{name}: {split} labels have shape {y.shape}, expected ({x.shape[0]},)"
            )
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name}: {split} labels must lie in [0, {num_classes}), "
                f"got range [{y.min()}, {y.max()}]"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{name}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} "
            "differ in shape"
        )
    train64 = x_train.astype(np.float64)
    mean = train64.mean(axis=(0, 1, 2))
    std = train64.std(axis=(0, 1, 2))
    std = np.where(std > 0, std, 1.0)
    x_tr = ((train64 - mean) / std).astype(np.float32)
    x_te = ((x_test.astype(np.float64) - mean) / std).astype(np.float32)
    return Dataset(
        x_train=x_tr,
        y_train=np.asarray(y_train, dtype=np.int32),
        x_test=x_te,
        y_test=np.asarray(y_test, dtype=np.int32),
        num_classes=int(num_classes),
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Bundled digits
# --------------------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes).

    The split is stratified (each class contributes ``round(test_fraction * count)`` images to
    the test split) and deterministic given ``seed``. Nothing is downloaded: the data ship
    with scikit-learn.

    Args:
        test_fraction: fraction of each class held out for the test split, in ``(0, 1)``.
        seed: seed of the split and of the order of both splits.

    Returns:
        A :class:`Dataset` with ``x_train`` ``[N, 8, 8, 1]`` and ``x_test`` ``[M, 8, 8, 1]``,
        ``N + M = 1797`` (``M = 450`` for the default fraction).
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)[..., None]  # [1797, 8, 8, 1], 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(float(test_fraction) * members.size)
        n_test = min(max(n_test, 1), members.size - 1)
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    tr = rng.permutation(np.concatenate(train_idx))
    te = rng.permutation(np.concatenate(test_idx))
    return _make_dataset(images[tr], labels[tr], images[te], labels[te], 10, "digits")


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[np.dtype, int] = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or raw.

    Layout: two zero bytes, a dtype code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes and the big-endian data. Gzip compression is detected from
    the file's first bytes, whatever its name.

    Args:
        path: file to read.

    Returns:
        An array with the file's shape and dtype, in native byte order.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on a bad magic number, an unknown dtype code, or a size that does not
            match the header.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; "
            "expected 0x0000 followed by a dtype code and the number of dimensions"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dims)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} of {dtype} ({expected} bytes in all), "
            f"but the file holds {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``.

    The file is written atomically (to a temporary file in the same directory, then
    ``os.replace``), so readers never see a partial file.

    Args:
        path: destination file.
        array: array of 1 to 255 dimensions, dtype uint8, int8, int16, int32, float32 or
            float64.

    Raises:
        ValueError: for an unsupported dtype or number of dimensions.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"array: dtype {array.dtype} cannot be written as IDX; use one of "
            + ", ".join(str(d) for d in _IDX_CODES)
        )
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array: IDX needs 1 to 255 dimensions, got {array.ndim}")
    if any(s >= 2**32 for s in array.shape):
        raise ValueError(f"array: every dimension must be < 2**32, got shape {array.shape}")
    payload = (
        bytes([0, 0, code, array.ndim])
        + np.asarray(array.shape, dtype=">u4").tobytes()
        + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    )
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_candidates(stem: str) -> list[str]:
    """File names accepted for one IDX file: ``stem``, ``stem.gz`` and the ``.idx3`` spelling."""
    dotted = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte (some mirrors)
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def _load_idx_dir(directory: Path, name: str, hint: str) -> Dataset:
    """Load the four standard IDX files of an MNIST-like dataset from ``directory``."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, stem in _IDX_STEMS.items():
        for candidate in _idx_candidates(stem):
            if (directory / candidate).is_file():
                found[key] = directory / candidate
                break
        else:
            missing.append(f"{stem}[.gz]")
    if missing:
        where = "does not exist" if not directory.is_dir() else "lacks " + ", ".join(missing)
        raise FileNotFoundError(
            f"{name}: directory {directory} {where}; expected the IDX files "
            + ", ".join(f"{s}[.gz]" for s in _IDX_STEMS.values())
            + (f". {hint}" if hint else "")
        )
    x_train = read_idx(found["train_images"])
    y_train = read_idx(found["train_labels"])
    x_test = read_idx(found["test_images"])
    y_test = read_idx(found["test_labels"])
    for key, arr, ndim in (
        ("train_images", x_train, 3),
        ("test_images", x_test, 3),
        ("train_labels", y_train, 1),
        ("test_labels", y_test, 1),
    ):
        if arr.ndim != ndim:
            raise ValueError(f"{name}: {found[key]} has shape {arr.shape}, expected {ndim} dims")
    return _make_dataset(x_train[..., None], y_train, x_test[..., None], y_test, 10, name)


def load_fashion_mnist(path: PathLike | None = None) -> Dataset:
    """Fashion-MNIST (60000 train / 10000 test 28x28 grey images, 10 classes) from IDX files.

    Args:
        path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``).
            Default: :data:`FASHION_MNIST_DIR`, where the Debian package
            ``dataset-fashion-mnist`` installs the gzipped files.

    Returns:
        A :class:`Dataset` with ``x_train`` ``[60000, 28, 28, 1]``, ``x_test``
        ``[10000, 28, 28, 1]``.

    Raises:
        FileNotFoundError: naming the directory and the missing files.
    """
    directory = FASHION_MNIST_DIR if path is None else Path(path)
    return _load_idx_dir(
        directory,
        "fashion_mnist",
        "On Debian/Ubuntu install them with `apt-get install dataset-fashion-mnist` "
        f"(into {FASHION_MNIST_DIR}), or pass path=",
    )


def load_mnist(path: PathLike) -> Dataset:
    """MNIST (60000 train / 10000 test 28x28 grey images, 10 classes) from IDX files.

    Args:
        path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``).

    Returns:
        A :class:`Dataset` with ``x_train`` ``[N, 28, 28, 1]`` and ``x_test`` ``[M, 28, 28, 1]``.

    Raises:
        FileNotFoundError: naming the directory and the missing files.
    """
    if path is None:
        raise ValueError("path: load_mnist needs the directory holding the MNIST IDX files")
    return _load_idx_dir(Path(path), "mnist", "")


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# --------------------------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 pickle batch -> (``[n, 32, 32, 3]`` uint8, ``[n]`` int64)."""
    with open(file, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"cifar10: {file} lacks the keys b'data' and b'labels'")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"cifar10: {file} data has shape {data.shape}, expected [n, 3072]")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-first -> HWC
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"cifar10: {file} has {images.shape[0]} images but labels of shape {labels.shape}"
        )
    return images, labels


def load_cifar10(path: PathLike) -> Dataset:
    """CIFAR-10 (50000 train / 10000 test 32x32 RGB images, 10 classes), python version.

    Reads ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` of the official
    ``cifar-10-batches-py`` directory (pickled dicts with ``b'data'`` ``[n, 3072]`` uint8 in
    channel-first row-major order and ``b'labels'``). The files are unpickled, so only load
    files you trust.

    Args:
        path: the ``cifar-10-batches-py`` directory or its parent.

    Returns:
        A :class:`Dataset` with ``x_train`` ``[50000, 32, 32, 3]``, ``x_test``
        ``[10000, 32, 32, 3]`` (channels last).

    Raises:
        FileNotFoundError: naming the directory and the missing batch files.
    """
    if path is None:
        raise ValueError("path: load_cifar10 needs the cifar-10-batches-py directory")
    directory = Path(path)
    if (directory / _CIFAR_DIR).is_dir():
        directory = directory / _CIFAR_DIR
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        where = "does not exist" if not directory.is_dir() else "lacks " + ", ".join(missing)
        raise FileNotFoundError(
            f"cifar10: directory {directory} {where}; expected {_CIFAR_DIR}/ with "
            + ", ".join(names)
            + " (the python version of CIFAR-10), or its parent directory"
        )
    train = [_read_cifar_batch(directory / n) for n in _CIFAR_TRAIN]
    x_test, y_test = _read_cifar_batch(directory / _CIFAR_TEST)
    x_train = np.concatenate([b[0] for b in train])
    y_train = np.concatenate([b[1] for b in train])
    return _make_dataset(x_train, y_train, x_test, y_test, 10, "cifar10")


# --------------------------------------------------------------------------------------------
# Your own arrays (.npz)
# --------------------------------------------------------------------------------------------

#: The ``name`` prefix of :func:`load_dataset` that selects :func:`load_npz`.
NPZ_PREFIX = "npz:"


def _npz_images(x: np.ndarray, what: str, path: Path) -> np.ndarray:
    """``[N, H, W, C]`` from ``[N, H, W, C]``, ``[N, H, W]`` (one channel) or ``[N, D]``."""
    if x.ndim == 2:  # feature vectors: D channels of a 1x1 "image" (normalised per feature)
        return x[:, None, None, :]
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4:
        return x
    raise ValueError(
        f"npz: {str(path)!r}: {what} must be [N, D], [N, H, W] or [N, H, W, C], "
        f"got shape {x.shape}"
    )


def load_npz(path: PathLike, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Your own classification data from one ``.npz`` file (``numpy.savez``).

    Arrays the file holds:

    * ``x`` — train inputs ``[N, H, W, C]``, ``[N, H, W]`` (grey images: one channel is
      added) or ``[N, D]`` (feature vectors, stored as ``[N, 1, 1, D]``: every feature is
      normalised on its own); any real dtype;
    * ``y`` — train labels ``[N]``, integers in ``[0, C)``;
    * optionally ``x_test`` and ``y_test`` (both or neither), the same layout; without them
      a stratified ``test_fraction`` of ``x`` is held out (seeded by ``seed``);
    * optionally ``num_classes``, a scalar (default: the largest label + 1).

    Args:
        path: the ``.npz`` file.
        test_fraction: held-out fraction of each class when the file has no test split.
        seed: seed of that split.

    Returns:
        The :class:`Dataset` (``name`` ``'npz:<file name>'``), inputs normalised per channel
        with train statistics like every other loader.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the array, for a missing or malformed array or an unreadable file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz: no such file {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"npz: cannot read {str(path)!r} as a .npz file: {err}") from err
    found = sorted(arrays)
    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(
                f"npz: {str(path)!r} has no array {key!r} (it holds {found}); save the train "
                "inputs as x [N, ...] and the labels as y [N]"
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(
            f"npz: {str(path)!r} must hold both x_test and y_test or neither (it holds {found})"
        )
    splits = {}
    for split, xk, yk in (("train", "x", "y"), ("test", "x_test", "y_test")):
        if xk not in arrays:
            continue
        x, y = arrays[xk], arrays[yk]
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"npz: {str(path)!r}: {xk} must hold numbers, got dtype {x.dtype}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"npz: {str(path)!r}: {yk} must be integer labels [N], got shape {y.shape} of "
                f"{y.dtype}"
            )
        if x.shape[:1] != y.shape:
            raise ValueError(
                f"npz: {str(path)!r}: {xk} has {x.shape[0] if x.ndim else 0} rows but {yk} "
                f"has {y.shape[0]} labels"
            )
        if y.size == 0:
            raise ValueError(f"npz: {str(path)!r}: {yk} is empty")
        if y.min() < 0:
            raise ValueError(f"npz: {str(path)!r}: {yk} holds negative labels")
        splits[split] = (_npz_images(x, xk, path), y.astype(np.int64))
    labels = [s[1] for s in splits.values()]
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.shape != () or not np.issubdtype(nc.dtype, np.integer) or int(nc) < 1:
            raise ValueError(
                f"npz: {str(path)!r}: num_classes must be a positive integer scalar, got {nc!r}"
            )
        num_classes = int(nc)
    else:
        num_classes = int(max(int(y.max()) for y in labels)) + 1
    x_train, y_train = splits["train"]
    if "test" in splits:
        x_test, y_test = splits["test"]
    else:
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        rng = np.random.default_rng(seed)
        train_idx, test_idx = [], []
        for c in np.unique(y_train):
            members = rng.permutation(np.flatnonzero(y_train == c))
            n_test = min(round(float(test_fraction) * members.size), members.size - 1)
            test_idx.append(members[:n_test])
            train_idx.append(members[n_test:])
        tr = rng.permutation(np.concatenate(train_idx))
        te = rng.permutation(np.concatenate(test_idx))
        if te.size == 0:
            raise ValueError(
                f"npz: {str(path)!r}: too few examples to hold out a test split; add x_test "
                "and y_test"
            )
        x_train, y_train, x_test, y_test = x_train[tr], y_train[tr], x_train[te], y_train[te]
    return _make_dataset(x_train, y_train, x_test, y_test, num_classes, f"npz:{path.name}")


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

_DATASET_ALIASES = {
    "digits": "digits",
    "fashion_mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "cifar_10": "cifar10",
}


def load_dataset(name: str, path: PathLike | None = None) -> Dataset:
    """Load a dataset by name.

    Args:
        name: ``'digits'``, ``'fashion_mnist'`` (or ``'fashion-mnist'``), ``'mnist'`` or
            ``'cifar10'`` (case-insensitive; ``-`` and ``_`` are interchangeable), or
            ``'npz:PATH'`` for your own arrays (:func:`load_npz`).
        path: where the files are. Ignored for ``'digits'`` (bundled with scikit-learn);
            optional for ``'fashion_mnist'`` (default :data:`FASHION_MNIST_DIR`); required for
            ``'mnist'`` and ``'cifar10'``.

    Returns:
        The :class:`Dataset`.
    """
    if str(name).startswith(NPZ_PREFIX):
        return load_npz(str(name)[len(NPZ_PREFIX) :])
    key = _DATASET_ALIASES.get(str(name).strip().lower().replace("-", "_"))
    if key is None:
        raise ValueError(
            f"name: unknown dataset {name!r}; choose one of 'digits', 'fashion_mnist', "
            "'mnist', 'cifar10', or 'npz:PATH' for your own arrays"
        )
    if key == "digits":
        return load_digits()
    if key == "fashion_mnist":
        return load_fashion_mnist(path)
    if path is None:
        raise ValueError(f"path: dataset {name!r} needs the directory holding its files")
    if key == "mnist":
        return load_mnist(path)
    return load_cifar10(path)


# --------------------------------------------------------------------------------------------
# Partitions over nodes
# --------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels must not be empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return labels


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_num_nodes(num_nodes: int, num_samples: int) -> int:
    num_nodes = _check_positive_int(num_nodes, "num_nodes")
    if num_nodes > num_samples:
        raise ValueError(f"num_nodes={num_nodes} exceeds the number of samples {num_samples}")
    return num_nodes


def partition_iid(
    labels: np.ndarray | Sequence[int],
    num_nodes: int,
    samples_per_node: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Disjoint uniformly random split of the train set over nodes.

    Args:
        labels: ``[N]`` integer train labels (only their number is used).
        num_nodes: number of nodes ``n``.
        samples_per_node: samples given to each node; default ``N // n``. Needs
            ``n * samples_per_node <= N``; the remaining samples are unused.
        seed: seed of the split.

    Returns:
        ``n`` sorted int64 index arrays ``[samples_per_node]`` into the train set, pairwise
        disjoint.
    """
    labels = _check_labels(labels)
    num_nodes = _check_num_nodes(num_nodes, labels.size)
    if samples_per_node is None:
        samples_per_node = labels.size // num_nodes
    samples_per_node = _check_positive_int(samples_per_node, "samples_per_node")
    if num_nodes * samples_per_node > labels.size:
        raise ValueError(
            f"samples_per_node={samples_per_node} times num_nodes={num_nodes} exceeds the "
            f"{labels.size} available samples"
        )
    perm = np.random.default_rng(seed).permutation(labels.size)
    blocks = perm[: num_nodes * samples_per_node].reshape(num_nodes, samples_per_node)
    return [np.sort(b).astype(np.int64) for b in blocks]


def partition_dirichlet(
    labels: np.ndarray | Sequence[int],
    num_nodes: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over nodes with Dirichlet(alpha) proportions.

    For every class, proportions ``p ~ Dirichlet(alpha * 1_n)`` are drawn and the class's
    (shuffled) samples are cut accordingly. The whole draw is repeated until every node holds
    at least ``min_size`` samples. Small ``alpha`` (e.g. 0.1) gives strongly skewed label
    distributions; large ``alpha`` (e.g. 100) approaches an IID split. Every sample is used.

    Args:
        labels: ``[N]`` integer train labels.
        num_nodes: number of nodes ``n``.
        alpha: Dirichlet concentration, > 0.
        seed: seed of the split.
        min_size: minimum number of samples per node, >= 0.
        max_tries: how many draws to try before giving up.

    Returns:
        ``n`` sorted int64 index arrays into the train set, pairwise disjoint, covering it.

    Raises:
        ValueError: for bad arguments, or if no draw within ``max_tries`` gives every node
            ``min_size`` samples (raise ``alpha`` or lower ``min_size``).
    """
    labels = _check_labels(labels)
    num_nodes = _check_num_nodes(num_nodes, labels.size)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
    if min_size * num_nodes > labels.size:
        raise ValueError(
            f"min_size={min_size} times num_nodes={num_nodes} exceeds the {labels.size} samples"
        )
    max_tries = _check_positive_int(max_tries, "max_tries")
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for members in classes:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_nodes, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
            for node, piece in enumerate(np.split(members, cuts)):
                buckets[node].append(piece)
        parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(p.size for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"partition_dirichlet: no draw in {max_tries} tries gave every one of {num_nodes} nodes "
        f"at least min_size={min_size} samples with alpha={alpha}; raise alpha or lower min_size"
    )


def partition_shards(
    labels: np.ndarray | Sequence[int],
    num_nodes: int,
    shards_per_node: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al.): nodes get a few label-sorted shards.

    Samples are sorted by label (random order within a label), cut into
    ``num_nodes * shards_per_node`` equal shards of ``N // (num_nodes * shards_per_node)``
    samples (the remainder is dropped), and the shards are dealt out at random, so each node
    sees about ``shards_per_node`` labels (a shard may straddle two labels).

    Args:
        labels: ``[N]`` integer train labels.
        num_nodes: number of nodes ``n``.
        shards_per_node: shards per node, >= 1.
        seed: seed of the within-label order and of the dealing.

    Returns:
        ``n`` sorted int64 index arrays ``[shards_per_node * shard_size]``, pairwise disjoint.
    """
    labels = _check_labels(labels)
    num_nodes = _check_num_nodes(num_nodes, labels.size)
    shards_per_node = _check_positive_int(shards_per_node, "shards_per_node")
    num_shards = num_nodes * shards_per_node
    shard_size = labels.size // num_shards
    if shard_size < 1:
        raise ValueError(
            f"num_nodes * shards_per_node = {num_shards} shards exceed the {labels.size} samples"
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(labels.size)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = order[: num_shards * shard_size].reshape(num_shards, shard_size)
    dealt = rng.permutation(num_shards).reshape(num_nodes, shards_per_node)
    return [np.sort(shards[d].ravel()).astype(np.int64) for d in dealt]


def partition(
    kind: str,
    labels: np.ndarray | Sequence[int],
    num_nodes: int,
    *,
    seed: int = 0,
    samples_per_node: int | None = None,
    alpha: float = 0.5,
    shards_per_node: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split the train set over nodes by name.

    Args:
        kind: ``'iid'`` (:func:`partition_iid`, uses ``samples_per_node``), ``'dirichlet'``
            (:func:`partition_dirichlet`, uses ``alpha``) or ``'shards'``
            (:func:`partition_shards`, uses ``shards_per_node``).
        labels: ``[N]`` integer train labels.
        num_nodes: number of nodes ``n``.
        seed: seed of the split.
        samples_per_node: see :func:`partition_iid`.
        alpha: see :func:`partition_dirichlet`.
        shards_per_node: see :func:`partition_shards`.
        min_size: for ``'dirichlet'``, the draw is repeated until every node holds at least
            this many samples (:func:`partition_dirichlet`); the experiments pass one batch,
            so that every seed gives a split a run can use. The first draw that qualifies is
            kept, so a seed whose first draw already qualifies gives the same split whatever
            ``min_size``. Ignored by the other kinds (their parts are of equal size).

    Returns:
        ``n`` int64 index arrays into the train set.
    """
    if kind == "iid":
        return partition_iid(labels, num_nodes, samples_per_node=samples_per_node, seed=seed)
    if kind == "dirichlet":
        return partition_dirichlet(labels, num_nodes, alpha=alpha, seed=seed, min_size=min_size)
    if kind == "shards":
        return partition_shards(labels, num_nodes, shards_per_node=shards_per_node, seed=seed)
    raise ValueError(f"kind: unknown partition {kind!r}; choose 'iid', 'dirichlet' or 'shards'")


# --------------------------------------------------------------------------------------------
# Per-node batch streams
# --------------------------------------------------------------------------------------------

_SHUFFLE_STREAM = 0
_RESAMPLE_STREAM = 1


#: Epochs are drawn in blocks of about this many samples per node (at least one epoch), one
#: generator per (node, block): few generators even for tiny parts, random access by block.
_BLOCK_SAMPLES = 4096


def _epochs_per_block(draws: int) -> int:
    return max(1, _BLOCK_SAMPLES // draws)


def _block_rng(seed: int, stream: int, node: int, block: int) -> np.random.Generator:
    """Independent generator for one (node, block of epochs), derived from ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, node, block)))


class Stream(NamedTuple):
    """Validated description of a per-node batch stream (see :func:`check_stream`)."""

    parts: list[np.ndarray]  # n index arrays into the train set
    draws: list[int]  # samples per epoch per node
    num_train: int
    steps: int
    batch_size: int
    seed: int
    resample: bool


def check_stream(
    x: np.ndarray,
    y: np.ndarray,
    parts: Sequence[np.ndarray],
    steps: int,
    batch_size: int,
    seed: int,
    resample: bool,
    samples_per_node: int | None,
) -> Stream:
    """Validates the arguments of :func:`node_batches`; returns the stream they describe."""
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x [N, ...] and y [N] must share their leading axis, got {x.shape} and {y.shape}"
        )
    num_train = int(x.shape[0])
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if len(parts) == 0:
        raise ValueError("parts must hold one index array per node, got none")
    checked = []
    for k, part in enumerate(parts):
        part = np.asarray(part)
        if part.ndim != 1 or not np.issubdtype(part.dtype, np.integer):
            raise ValueError(
                f"parts[{k}] must be a 1-D integer index array, got {part.shape} of {part.dtype}"
            )
        if part.size and (part.min() < 0 or part.max() >= num_train):
            raise ValueError(f"parts[{k}] holds indices outside [0, {num_train})")
        checked.append(part.astype(np.int64))
    if resample:
        if samples_per_node is None:
            draws = [p.size for p in checked]
        else:
            draws = [_check_positive_int(samples_per_node, "samples_per_node")] * len(checked)
        for k, d in enumerate(draws):
            if d < batch_size:
                raise ValueError(
                    f"node {k} draws {d} samples per epoch, fewer than batch_size={batch_size}"
                )
    else:
        if samples_per_node is not None:
            raise ValueError("samples_per_node is only used with resample=True")
        draws = [p.size for p in checked]
        for k, d in enumerate(draws):
            if d < batch_size:
                raise ValueError(
                    f"parts[{k}] (node {k}) holds {d} samples, fewer than batch_size={batch_size}"
                )
    return Stream(checked, draws, num_train, steps, batch_size, int(seed), bool(resample))


def stream_indices(stream: Stream, start: int, stop: int) -> np.ndarray:
    """Train-set indices of steps ``[start, stop)`` of the stream, ``[stop - start, n, B]``.

    Node k's stream is a sequence of epochs of ``draws`` samples (a permutation of its part,
    or draws with replacement from the whole train set), each cut into ``draws // B`` batches
    (remainder dropped). Epochs are generated in blocks of ``_epochs_per_block(draws)``, each
    block from its own generator, so only the blocks overlapping ``[start, stop)`` are built.
    """
    b = stream.batch_size
    per_node = []
    for k, (part, draws) in enumerate(zip(stream.parts, stream.draws)):
        per_epoch = draws // b  # batches per epoch; the remainder of an epoch is dropped
        epochs_per_block = _epochs_per_block(draws)
        per_block = per_epoch * epochs_per_block  # batches per block
        first, last = start // per_block, (stop - 1) // per_block
        blocks = []
        for block in range(first, last + 1):
            if stream.resample:
                rng = _block_rng(stream.seed, _RESAMPLE_STREAM, k, block)
                shape = (epochs_per_block, draws)
                drawn = rng.integers(0, stream.num_train, size=shape, dtype=np.int64)
            else:
                rng = _block_rng(stream.seed, _SHUFFLE_STREAM, k, block)
                order = np.tile(np.arange(draws), (epochs_per_block, 1))
                drawn = part[rng.permuted(order, axis=1)]  # an independent shuffle per epoch
            blocks.append(drawn[:, : per_epoch * b].reshape(-1))
        batches = np.concatenate(blocks).reshape(-1, b)
        offset = start - first * per_block
        per_node.append(batches[offset : offset + (stop - start)])
    return np.stack(per_node, axis=1)


def gather_batches(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """``{"x": x[idx] float32, "y": y[idx] int32}`` for train-set indices ``idx``."""
    return {
        "x": np.take(x, idx, axis=0).astype(np.float32, copy=False),
        "y": np.take(y, idx, axis=0).astype(np.int32, copy=False),
    }


def node_batches(
    x: np.ndarray,
    y: np.ndarray,
    parts: Sequence[np.ndarray],
    steps: int,
    batch_size: int,
    *,
    seed: int = 0,
    resample: bool = False,
    samples_per_node: int | None = None,
) -> dict[str, np.ndarray]:
    """Mini-batches of every node for every step, stacked as ``simulate`` expects.

    Default mode: each node walks through epochs of its own part, reshuffled every epoch;
    an epoch yields ``len(part) // batch_size`` batches (the remainder is dropped), so each
    sample of the part appears at most once per epoch. ``resample=True`` is the DICE
    reference code's mode: every epoch each node draws ``samples_per_node`` (default: the size
    of its part) indices *with replacement* from the whole train set, then batches through
    them; ``parts`` then only sets the per-node epoch sizes.

    Randomness comes from independent generators per node (one per block of epochs, about
    4096 samples) derived from ``seed``, so the stream is deterministic and any window of it
    can be produced without generating what precedes it (see :func:`batch_chunks`).

    Args:
        x: ``[N, H, W, C]`` train images (any trailing shape works).
        y: ``[N]`` train labels.
        parts: ``n`` integer index arrays into ``x`` (one per node).
        steps: number of steps ``T``.
        batch_size: batch size ``B`` per node and step.
        seed: stream seed.
        resample: draw each epoch with replacement from the whole train set.
        samples_per_node: samples drawn per node and epoch with ``resample=True``.

    Returns:
        ``{'x': [T, n, B, H, W, C] float32, 'y': [T, n, B] int32}``.

    Raises:
        ValueError: for bad arguments, or a node with fewer than ``batch_size`` samples per
            epoch.
    """
    x, y = np.asarray(x), np.asarray(y)
    stream = check_stream(x, y, parts, steps, batch_size, seed, resample, samples_per_node)
    return gather_batches(x, y, stream_indices(stream, 0, stream.steps))


def batch_chunks(
    x: np.ndarray,
    y: np.ndarray,
    parts: Sequence[np.ndarray],
    steps: int,
    batch_size: int,
    chunk_steps: int,
    *,
    seed: int = 0,
    resample: bool = False,
    samples_per_node: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The stream of :func:`node_batches` in pieces of ``chunk_steps`` steps.

    Concatenating the chunks along axis 0 gives exactly ``node_batches(...)`` with the same
    arguments; only one chunk's batches (and index arrays) are in memory at a time. Arguments
    are validated when this function is called, not when iteration starts.

    Args:
        x, y, parts, steps, batch_size, seed, resample, samples_per_node: as in
            :func:`node_batches`.
        chunk_steps: steps per chunk, >= 1; the last chunk may be shorter.

    Returns:
        An iterator of ``{'x': [S, n, B, H, W, C] float32, 'y': [S, n, B] int32}`` with
        ``S = chunk_steps`` (last chunk: ``S <= chunk_steps``).
    """
    x, y = np.asarray(x), np.asarray(y)
    stream = check_stream(x, y, parts, steps, batch_size, seed, resample, samples_per_node)
    chunk_steps = _check_positive_int(chunk_steps, "chunk_steps")

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, stream.steps, chunk_steps):
            stop = min(start + chunk_steps, stream.steps)
            yield gather_batches(x, y, stream_indices(stream, start, stop))

    return chunks()


# --------------------------------------------------------------------------------------------
# Evaluation sets
# --------------------------------------------------------------------------------------------


def probe_set(dataset: Dataset, size: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed probe batch ``z'`` drawn without replacement from the test split.

    In the DICE paper (and its reference code) the probe loss ``L(θ; z')`` on one fixed batch
    of test images, shared by all nodes, is what influence is measured on.

    Args:
        dataset: the dataset.
        size: number of probe samples, ``1 <= size <= M``.
        seed: seed of the draw.

    Returns:
        ``{'x': [size, H, W, C] float32, 'y': [size] int32}``.
    """
    size = _check_positive_int(size, "size")
    num_test = dataset.x_test.shape[0]
    if size > num_test:
        raise ValueError(f"size={size} exceeds the {num_test} test samples")
    idx = np.random.default_rng(seed).choice(num_test, size=size, replace=False)
    return {
        "x": np.asarray(dataset.x_test[idx], dtype=np.float32),
        "y": np.asarray(dataset.y_test[idx], dtype=np.int32),
    }


def test_set(dataset: Dataset, max_size: int | None = None) -> dict[str, np.ndarray]:
    """The test split as a batch, optionally only its first ``max_size`` samples.

    Args:
        dataset: the dataset.
        max_size: keep the first ``max_size`` samples (>= 1); default all ``M``.

    Returns:
        ``{'x': [M', H, W, C] float32, 'y': [M'] int32}`` with ``M' = min(M, max_size)``.
    """
    stop = None if max_size is None else _check_positive_int(max_size, "max_size")
    return {
        "x": np.asarray(dataset.x_test[:stop], dtype=np.float32),
        "y": np.asarray(dataset.y_test[:stop], dtype=np.int32),
    }


# pytest would otherwise try to collect ``test_set`` when tests import it by name.
test_set.__test__ = False  # type: ignore[attr-defined]

"""Tests of dicejax.data: loaders, IDX files, partitions, batch streams, probe sets."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from dicejax import data as dd

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(scope="module")
def digits() -> dd.Dataset:
    return dd.load_digits()


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference per-channel normalisation with train statistics (float64)."""
    mean = train.mean(axis=(0, 1, 2))
    std = train.std(axis=(0, 1, 2))
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_normalisation(digits: dd.Dataset) -> None:
    assert digits.name == "digits"
    assert digits.num_classes == 10
    assert digits.input_shape == (8, 8, 1)
    assert digits.x_train.shape == (1347, 8, 8, 1)
    assert digits.x_test.shape == (450, 8, 8, 1)
    assert digits.y_train.shape == (1347,) and digits.y_test.shape == (450,)
    assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32
    np.testing.assert_allclose(digits.x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(digits.x_train.std(), 1.0, atol=1e-5)
    # The test split went through the same affine map: its pixel levels are train levels.
    train_levels = np.unique(digits.x_train)
    test_levels = np.unique(digits.x_test)
    assert len(train_levels) == 17
    nearest = np.abs(test_levels[:, None] - train_levels[None, :]).min(axis=1)
    assert nearest.max() < 1e-6


def test_digits_stratified_and_deterministic(digits: dd.Dataset) -> None:
    counts_test = np.bincount(digits.y_test, minlength=10)
    counts_all = counts_test + np.bincount(digits.y_train, minlength=10)
    assert np.all(np.abs(counts_test - 0.25 * counts_all) <= 1)
    again = dd.load_digits()
    for a, b in zip(digits, again):
        np.testing.assert_array_equal(a, b)
    other = dd.load_digits(seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)
    small = dd.load_digits(test_fraction=0.1)
    assert small.x_train.shape[0] + small.x_test.shape[0] == 1797
    assert 170 <= small.x_test.shape[0] <= 190
    with pytest.raises(ValueError, match="test_fraction"):
        dd.load_digits(test_fraction=1.0)


# --------------------------------------------------------------------------------------------
# IDX files and the MNIST-like loaders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / f"arr{suffix}"
    dd.write_idx(path, arr)
    back = dd.read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left over
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")


def test_idx_header_layout(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    dd.write_idx(path, np.array([1, 2, 258], dtype=np.int32))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 1])
    assert raw[4:8] == (3).to_bytes(4, "big")
    assert raw[8:] == b"\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x01\x02"


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(bytes([1, 0, 8, 1]) + (2).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match="magic"):
        dd.read_idx(bad)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(b"\x12\x34\x08\x01"))
    with pytest.raises(ValueError, match="magic"):
        dd.read_idx(bad_gz)
    code = tmp_path / "code"
    code.write_bytes(bytes([0, 0, 0x42, 1]) + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match="dtype code"):
        dd.read_idx(code)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match="bytes"):
        dd.read_idx(short)
    with pytest.raises(ValueError, match="dtype"):
        dd.write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def _write_mnist_like(directory: Path, rng: np.random.Generator, gz: dict[str, bool]) -> dict:
    arrays = {
        "train_images": rng.integers(0, 256, size=(12, 28, 28)).astype(np.uint8),
        "train_labels": rng.integers(0, 10, size=12).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8),
        "test_labels": rng.integers(0, 10, size=5).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        dd.write_idx(directory / (IDX_NAMES[key] + (".gz" if gz[key] else "")), arr)
    return arrays


@pytest.mark.parametrize("loader", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz_pattern", [(True, True, True, True), (False, True, False, False)])
def test_idx_loaders_round_trip(tmp_path: Path, loader: str, gz_pattern: tuple) -> None:
    gz = dict(zip(IDX_NAMES, gz_pattern))
    arrays = _write_mnist_like(tmp_path, np.random.default_rng(1), gz)
    ds = dd.load_mnist(tmp_path) if loader == "mnist" else dd.load_fashion_mnist(path=tmp_path)
    assert ds.name == loader and ds.num_classes == 10
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    want_train, want_test = _normalise(
        arrays["train_images"][..., None].astype(np.float64),
        arrays["test_images"][..., None].astype(np.float64),
    )
    np.testing.assert_allclose(ds.x_train, want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_test, want_test, rtol=1e-5, atol=1e-5)
    same = dd.load_dataset("fashion-mnist" if loader == "fashion_mnist" else "mnist", tmp_path)
    np.testing.assert_array_equal(same.x_train, ds.x_train)


def test_idx_loaders_missing_files(tmp_path: Path) -> None:
    absent = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        dd.load_fashion_mnist(absent)
    message = str(err.value)
    assert str(absent) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte" in message
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dd.load_mnist(absent)
    gz = dict.fromkeys(IDX_NAMES, True)
    _write_mnist_like(tmp_path / "partial", np.random.default_rng(0), gz)
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        dd.load_mnist(tmp_path / "partial")


@pytest.mark.skipif(
    not (dd.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    and not (dd.FASHION_MNIST_DIR / "train-images-idx3-ubyte").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_installed() -> None:
    ds = dd.load_fashion_mnist()
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    assert abs(float(ds.x_train.mean())) < 1e-3
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-3


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


def _fake_cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 32, 32, 3] uint8: channel c = 50 c + (row if c == 0, column if c == 1, random if 2)."""
    rows = np.broadcast_to(np.arange(32)[:, None], (32, 32))
    cols = np.broadcast_to(np.arange(32)[None, :], (32, 32))
    img = np.empty((n, 32, 32, 3), dtype=np.uint8)
    img[..., 0] = rows
    img[..., 1] = 50 + cols
    img[..., 2] = 100 + rng.integers(0, 32, size=(n, 1, 1))
    return img


def _write_fake_cifar(parent: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    directory = parent / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    xs, ys = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = 3 if name == "test_batch" else 2
        img = _fake_cifar_images(rng, n)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        flat = img.transpose(0, 3, 1, 2).reshape(n, 3072)  # channel-first, row-major
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": flat}, f)
        xs.append(img)
        ys.append(np.asarray(labels))
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def test_load_cifar10_layout(tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = _write_fake_cifar(tmp_path)
    ds = dd.load_cifar10(tmp_path)  # the parent directory
    ds2 = dd.load_cifar10(tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(ds.x_train, ds2.x_train)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.input_shape == (32, 32, 3)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)
    want_train, want_test = _normalise(x_train.astype(np.float64), x_test.astype(np.float64))
    np.testing.assert_allclose(ds.x_train, want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_test, want_test, rtol=1e-5, atol=1e-5)
    # Channel 0 grows down the rows, channel 1 along the columns, channel 2 is flat per image.
    x = ds.x_train
    assert np.all(np.diff(x[..., 0], axis=1) > 0) and np.all(np.diff(x[..., 0], axis=2) == 0)
    assert np.all(np.diff(x[..., 1], axis=2) > 0) and np.all(np.diff(x[..., 1], axis=1) == 0)
    assert np.all(x[..., 2] == x[:, :1, :1, 2])
    assert np.array_equal(dd.load_dataset("cifar10", tmp_path).y_test, ds.y_test)


def test_load_cifar10_missing(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        dd.load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dd.load_cifar10(tmp_path / "nothing")


def test_load_dataset_dispatch(digits: dd.Dataset) -> None:
    np.testing.assert_array_equal(dd.load_dataset("digits").x_train, digits.x_train)
    with pytest.raises(ValueError, match="unknown dataset"):
        dd.load_dataset("imagenet")
    with pytest.raises(ValueError, match="path"):
        dd.load_dataset("mnist")


# --------------------------------------------------------------------------------------------
# partitions
# --------------------------------------------------------------------------------------------


def _assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    return allidx


def test_partition_iid(digits: dd.Dataset) -> None:
    y = digits.y_train
    parts = dd.partition_iid(y, 10, seed=3)
    assert len(parts) == 10 and all(p.size == 134 for p in parts)
    allidx = _assert_disjoint(parts)
    assert allidx.min() >= 0 and allidx.max() < y.size
    parts2 = dd.partition_iid(y, 8, samples_per_node=100, seed=3)
    assert all(p.size == 100 for p in parts2)
    _assert_disjoint(parts2)
    again = dd.partition_iid(y, 10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dd.partition_iid(y, 10, seed=4)
    assert not np.array_equal(parts[0], other[0])
    with pytest.raises(ValueError, match="samples_per_node"):
        dd.partition_iid(y, 10, samples_per_node=200)


def _label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    ents = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / p.size
        freq = freq[freq > 0]
        ents.append(-(freq * np.log(freq)).sum())
    return float(np.mean(ents))


def test_partition_dirichlet(digits: dd.Dataset) -> None:
    y = digits.y_train
    skewed = dd.partition_dirichlet(y, 8, alpha=0.1, seed=0, min_size=10)
    flat = dd.partition_dirichlet(y, 8, alpha=1000.0, seed=0)
    for parts in (skewed, flat):
        allidx = _assert_disjoint(parts)
        assert allidx.size == y.size  # every sample is used
    assert min(p.size for p in skewed) >= 10
    assert _label_entropy(y, skewed) < 0.6 * _label_entropy(y, flat)
    assert _label_entropy(y, flat) > 0.95 * np.log(10)
    again = dd.partition_dirichlet(y, 8, alpha=0.1, seed=0, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again))
    with pytest.raises(ValueError, match="alpha"):
        dd.partition_dirichlet(y, 8, alpha=0.0)
    with pytest.raises(ValueError, match="min_size"):
        dd.partition_dirichlet(y, 8, alpha=0.5, min_size=1000)


def test_partition_by_name_redraws_dirichlet_below_min_size(digits: dd.Dataset) -> None:
    y = digits.y_train
    # seed 1: the first draw of this split leaves a node below one batch of 16 (the
    # experiments used to stop there); with min_size it is redrawn
    first = dd.partition("dirichlet", y, 16, alpha=0.3, seed=1)
    assert min(p.size for p in first) < 16
    parts = dd.partition("dirichlet", y, 16, alpha=0.3, seed=1, min_size=16)
    assert min(p.size for p in parts) >= 16
    assert _assert_disjoint(parts).size == y.size
    direct = dd.partition_dirichlet(y, 16, alpha=0.3, seed=1, min_size=16)
    assert all(np.array_equal(a, b) for a, b in zip(parts, direct, strict=True))
    # a seed whose first draw qualifies keeps its split whatever min_size
    ok = dd.partition("dirichlet", y, 16, alpha=0.3, seed=0)
    assert min(p.size for p in ok) >= 16
    same = dd.partition("dirichlet", y, 16, alpha=0.3, seed=0, min_size=16)
    assert all(np.array_equal(a, b) for a, b in zip(ok, same, strict=True))


def test_partition_shards(digits: dd.Dataset) -> None:
    y = digits.y_train
    parts = dd.partition_shards(y, 10, shards_per_node=2, seed=0)
    _assert_disjoint(parts)
    shard = y.size // 20
    assert all(p.size == 2 * shard for p in parts)
    num_labels = [len(np.unique(y[p])) for p in parts]
    assert max(num_labels) <= 4
    assert np.mean(num_labels) <= 3.5
    iid_labels = [len(np.unique(y[p])) for p in dd.partition_iid(y, 10)]
    assert min(iid_labels) == 10


def test_partition_dispatch_and_errors(digits: dd.Dataset) -> None:
    y = digits.y_train
    for kind, direct in (
        ("iid", dd.partition_iid(y, 4, seed=1)),
        ("dirichlet", dd.partition_dirichlet(y, 4, alpha=0.5, seed=1)),
        ("shards", dd.partition_shards(y, 4, shards_per_node=2, seed=1)),
    ):
        via = dd.partition(kind, y, 4, seed=1)
        assert all(np.array_equal(a, b) for a, b in zip(via, direct))
    with pytest.raises(ValueError, match="kind"):
        dd.partition("pathological", y, 4)
    for fn in (dd.partition_iid, dd.partition_shards):
        for bad in (0, -2):
            with pytest.raises(ValueError, match="num_nodes"):
                fn(y, bad)
    with pytest.raises(ValueError, match="num_nodes"):
        dd.partition_dirichlet(y, 0, alpha=0.5)
    with pytest.raises(ValueError, match="labels"):
        dd.partition_iid(y.reshape(-1, 1), 4)


# --------------------------------------------------------------------------------------------
# batch streams
# --------------------------------------------------------------------------------------------


def _indexed_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """x[i] holds the value i, so a batch tells which samples it contains."""
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    return x, np.arange(n) % 10


def test_node_batches_shapes_on_digits(digits: dd.Dataset) -> None:
    parts = dd.partition_iid(digits.y_train, 4, samples_per_node=64)
    b = dd.node_batches(digits.x_train, digits.y_train, parts, steps=7, batch_size=16)
    assert b["x"].shape == (7, 4, 16, 8, 8, 1) and b["x"].dtype == np.float32
    assert b["y"].shape == (7, 4, 16) and b["y"].dtype == np.int32


@pytest.mark.parametrize("block_samples", [4096, 30, 1])
def test_node_batches_epochs_walk_own_part(
    monkeypatch: pytest.MonkeyPatch, block_samples: int
) -> None:
    monkeypatch.setattr(dd, "_BLOCK_SAMPLES", block_samples)  # epochs drawn per generator
    x, y = _indexed_data(100)
    parts = [np.arange(0, 20), np.arange(20, 42), np.arange(50, 90)]  # 5, 5 and 10 batches/epoch
    b = dd.node_batches(x, y, parts, steps=20, batch_size=4, seed=7)
    idx = b["x"][..., 0, 0, 0].astype(np.int64)  # [T, n, B]
    np.testing.assert_array_equal(b["y"], idx % 10)
    for k, (part, per_epoch) in enumerate(zip(parts, (5, 5, 10))):
        assert np.isin(idx[:, k], part).all()  # every batch of node k comes from its part
        epochs = idx[:, k].reshape(-1, per_epoch * 4)
        for epoch in epochs:
            assert len(np.unique(epoch)) == epoch.size  # no repeats within an epoch
            if part.size % 4 == 0:
                np.testing.assert_array_equal(np.sort(epoch), part)  # every sample once
        assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(np.sort(idx[:5, 0].ravel()), np.sort(idx[:5, 1].ravel()))


def test_node_batches_determinism() -> None:
    x, y = _indexed_data(60)
    parts = dd.partition_iid(y, 3)
    a = dd.node_batches(x, y, parts, 9, 5, seed=1)
    b = dd.node_batches(x, y, parts, 9, 5, seed=1)
    c = dd.node_batches(x, y, parts, 9, 5, seed=2)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], b["y"])
    assert not np.array_equal(a["x"], c["x"])
    longer = dd.node_batches(x, y, parts, 20, 5, seed=1)
    np.testing.assert_array_equal(longer["x"][:9], a["x"])  # a prefix of the longer stream


def test_node_batches_resample_draws_from_whole_set() -> None:
    x, y = _indexed_data(200)
    parts = [np.arange(0, 16), np.arange(16, 32)]
    b = dd.node_batches(x, y, parts, steps=40, batch_size=8, seed=0, resample=True)
    idx = b["x"][..., 0, 0, 0].astype(np.int64)
    assert idx.shape == (40, 2, 8)
    assert (idx >= 32).mean() > 0.7  # mostly outside the nodes' own parts
    assert len(np.unique(idx)) > 150  # spread over the whole train set
    assert len(np.unique(idx[:, 0])) < idx[:, 0].size  # with replacement: repeats occur
    b2 = dd.node_batches(x, y, parts, 40, 8, seed=0, resample=True)
    np.testing.assert_array_equal(b["x"], b2["x"])
    more = dd.node_batches(x, y, parts, 6, 8, seed=0, resample=True, samples_per_node=20)
    assert more["x"].shape == (6, 2, 8, 1, 1, 1)
    with pytest.raises(ValueError, match="samples_per_node"):
        dd.node_batches(x, y, parts, 6, 8, samples_per_node=20)
    with pytest.raises(ValueError, match="batch_size"):
        dd.node_batches(x, y, parts, 6, 8, resample=True, samples_per_node=4)


@pytest.mark.parametrize("block_samples", [4096, 30])
@pytest.mark.parametrize("resample", [False, True])
@pytest.mark.parametrize("chunk_steps", [1, 4, 15, 100])
def test_batch_chunks_match_node_batches(
    monkeypatch: pytest.MonkeyPatch, block_samples: int, resample: bool, chunk_steps: int
) -> None:
    monkeypatch.setattr(dd, "_BLOCK_SAMPLES", block_samples)  # chunks cut across blocks too
    x, y = _indexed_data(90)
    parts = [np.arange(0, 13), np.arange(13, 50), np.arange(50, 58)]
    full = dd.node_batches(x, y, parts, 15, 4, seed=5, resample=resample)
    chunks = list(dd.batch_chunks(x, y, parts, 15, 4, chunk_steps, seed=5, resample=resample))
    sizes = [c["x"].shape[0] for c in chunks]
    assert sum(sizes) == 15 and all(s == chunk_steps for s in sizes[:-1])
    assert sizes[-1] <= chunk_steps
    for key in ("x", "y"):
        joined = np.concatenate([c[key] for c in chunks], axis=0)
        assert joined.dtype == full[key].dtype
        np.testing.assert_array_equal(joined, full[key])


def test_batch_stream_errors() -> None:
    x, y = _indexed_data(40)
    parts = [np.arange(0, 20), np.arange(20, 23)]
    with pytest.raises(ValueError, match=r"parts\[1\] \(node 1\)"):
        dd.node_batches(x, y, parts, 3, 4)
    with pytest.raises(ValueError, match="batch_size"):
        dd.batch_chunks(x, y, [np.arange(10)], 3, 0, 2)  # raised eagerly, before iteration
    with pytest.raises(ValueError, match="chunk_steps"):
        dd.batch_chunks(x, y, [np.arange(10)], 3, 2, 0)
    with pytest.raises(ValueError, match="steps"):
        dd.node_batches(x, y, [np.arange(10)], 0, 2)
    with pytest.raises(ValueError, match="parts"):
        dd.node_batches(x, y, [], 3, 2)
    with pytest.raises(ValueError, match=r"parts\[0\]"):
        dd.node_batches(x, y, [np.arange(35, 45)], 3, 2)
    with pytest.raises(ValueError, match="leading axis"):
        dd.node_batches(x, y[:-1], [np.arange(10)], 3, 2)


# --------------------------------------------------------------------------------------------
# probe and test sets
# --------------------------------------------------------------------------------------------


def test_probe_set(digits: dd.Dataset) -> None:
    probe = dd.probe_set(digits, size=32, seed=3)
    assert probe["x"].shape == (32, 8, 8, 1) and probe["y"].shape == (32,)
    assert probe["x"].dtype == np.float32 and probe["y"].dtype == np.int32
    again = dd.probe_set(digits, size=32, seed=3)
    np.testing.assert_array_equal(probe["x"], again["x"])
    other = dd.probe_set(digits, size=32, seed=4)
    assert not np.array_equal(probe["x"], other["x"])
    flat_test = digits.x_test.reshape(len(digits.x_test), -1)
    for xi, yi in zip(probe["x"].reshape(32, -1), probe["y"]):
        match = np.flatnonzero((flat_test == xi).all(axis=1))
        assert match.size >= 1 and yi in digits.y_test[match]
    assert len(np.unique(probe["x"].reshape(32, -1), axis=0)) >= 30  # drawn without replacement
    assert dd.probe_set(digits)["x"].shape[0] == 128
    with pytest.raises(ValueError, match="size"):
        dd.probe_set(digits, size=451)
    with pytest.raises(ValueError, match="size"):
        dd.probe_set(digits, size=0)


def test_test_set(digits: dd.Dataset) -> None:
    full = dd.test_set(digits)
    assert full["x"].shape == (450, 8, 8, 1)
    np.testing.assert_array_equal(full["y"], digits.y_test)
    head = dd.test_set(digits, max_size=10)
    np.testing.assert_array_equal(head["x"], digits.x_test[:10])
    assert dd.test_set(digits, max_size=10_000)["x"].shape[0] == 450
    with pytest.raises(ValueError, match="max_size"):
        dd.test_set(digits, max_size=0)

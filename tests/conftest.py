"""Shared fixtures: tiny synthetic datasets written to tmp_path, never the real data."""

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import deepshrink.data

torch.set_num_threads(1)

# Normalising all of Fashion-MNIST takes seconds; the flow tests read the same few subsets again and again.
cached_load_data = functools.lru_cache(maxsize=4)(deepshrink.data.load_data)


@pytest.fixture
def load_data_once(monkeypatch):
    """Every ``deepshrink.data.load_data`` call (the CLI's included) served from one session-wide cache."""
    monkeypatch.setattr(deepshrink.data, "load_data", cached_load_data)


CIFAR_RECORD = 1 + 3 * 32 * 32


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array in IDX format (magic 0x0000 0x08 ndim, big-endian dims)."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def indexed_images(n: int, offset: int = 0, size: int = 28) -> np.ndarray:
    """uint8 images whose every pixel equals (offset + index): the image identifies its sample."""
    values = (np.arange(n) + offset).astype(np.uint8)
    return np.broadcast_to(values[:, None, None], (n, size, size)).copy()


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20, compress: bool = True) -> Path:
    """MNIST-format files where train image i is filled with value i and labelled i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    train_x, test_x = indexed_images(n_train), indexed_images(n_test, offset=100)
    write_idx(root / f"train-images-idx3-ubyte{suffix}", train_x, compress)
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", (np.arange(n_train) % 10).astype(np.uint8), compress)
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", test_x, compress)
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", ((np.arange(n_test) + 3) % 10).astype(np.uint8), compress)
    return root


def cifar_records(labels: list[int], seed: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([np.array(labels, np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    return records.tobytes(), images


def write_cifar(root: Path, per_batch: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """data_batch_1..5.bin + test_batch.bin; returns the (images, labels) written per file."""
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for i, name in enumerate(names):
        labels = [(i * per_batch + j) % 10 for j in range(per_batch)]
        data, images = cifar_records(labels, seed=i)
        (root / name).write_bytes(data)
        written[name] = (images, np.array(labels))
    return written


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    return write_mnist(tmp_path / "mnist")


def make_learnable_set(n: int = 256, seed: int = 123):
    """``n`` random 1x28x28 images; the label is a fixed function of the image, so it can be learnt."""
    from deepshrink.data import ImageSet

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 28, 28, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    # Stamp a class-specific bright patch: class k lights up row block k.
    for k in range(4):
        images[labels == k, :, 7 * k : 7 * k + 7, :] += 3.0
    return ImageSet(images, labels)


@pytest.fixture
def learnable_set():
    return make_learnable_set()

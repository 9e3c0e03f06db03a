"""Readers for the raw file formats: IDX (MNIST family), CIFAR-10 binary, npz.

Each returns numpy arrays and raises DatasetError with the file name on any
inconsistency, so a truncated download never turns into a silently wrong set.
"""

import gzip
import zlib
from pathlib import Path

import numpy as np

from deepshrink.core.errors import DatasetError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CIFAR_RECORD = 1 + 3 * 32 * 32


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt gzip data ({exc})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into an array of its declared shape."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: corrupt IDX file (header truncated)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{path}: corrupt IDX file ({len(data)} bytes, header declares {expected})")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_cifar_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Parse CIFAR-10 binary batches: records of 1 label byte + 3x32x32 image bytes."""
    images, labels = [], []
    for path in paths:
        data = _read_bytes(path)
        if not data or len(data) % CIFAR_RECORD:
            raise DatasetError(f"{path}: corrupt CIFAR-10 batch ({len(data)} bytes is not a multiple of {CIFAR_RECORD})")
        records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR_RECORD)
        if records[:, 0].max() > 9:
            raise DatasetError(f"{path}: corrupt CIFAR-10 batch (label > 9)")
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def read_npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``x_<split>``/``y_<split>`` from an .npz (no pickles) as NCHW images and int labels."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except KeyError as exc:
        raise DatasetError(f"{path}: missing array {exc} (expected x_train, y_train, x_test, y_test)") from None
    except (ValueError, OSError, TypeError, zlib.error) as exc:  # TypeError: a plain .npy is no context manager
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{path}: x_{split} must be N images (NHW/NCHW/NHWC) and y_{split} N labels; got {x.shape} and {y.shape}")
    return x, y.astype(np.int64)

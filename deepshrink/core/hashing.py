"""The HashedNets position hash (Chen et al. 2015): virtual weight i of a hashed layer is
``sign(i) * bucket[h(i)]``, with ``h`` and ``sign`` seeded hashes of the position. It lives in
core because both the method (``compress.share.hashing``) and the archive codec
(``encode.hashed``, which recomputes it when decoding) depend on this one function."""

import numpy as np
import torch

HASH = "splitmix64-position/1"  # names the hash below in every archive entry; change it only with a new name
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def position_hash(numel: int, buckets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket index, +-1 sign) for positions 0..numel-1 under ``seed``."""
    with np.errstate(over="ignore"):
        keys = np.arange(numel, dtype=np.uint64) + np.uint64(seed) * _GOLDEN
        mixed = _mix64(keys)
    index = torch.from_numpy((mixed % np.uint64(buckets)).astype(np.int64))
    sign = torch.from_numpy(np.where((mixed >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32))
    return index, sign

"""The HashedNets codec: a hashed layer's weight stored as its buckets plus the hash spec.

Virtual weight i of a hashed layer is ``sign(i) * bucket[h(i)]``, with ``h`` and
``sign`` seeded hashes of the position (Chen et al. 2015). The assignment costs no
storage: the archive keeps the float32 buckets, their count and the seed, and the
decoder recomputes the hash. The hash lives here, below ``compress``, because the
archive format depends on it: ``compress.share.hashing`` uses this one function.
"""

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


def hashed_weight(buckets: np.ndarray, numel: int, seed: int) -> np.ndarray:
    """The flat float32 weight ``buckets`` and the hash give (what the layer computes)."""
    index, sign = position_hash(numel, len(buckets), seed)
    return buckets.astype(np.float32)[index.numpy()] * sign.numpy()


def buckets_of(flat: np.ndarray, buckets: int, seed: int) -> np.ndarray | None:
    """The bucket array that hashes back to ``flat`` bit for bit, or None when ``flat`` is not
    (any longer) a hashed weight of this spec, e.g. a later step pruned or quantized it."""
    if flat.dtype != np.float32 or not 1 <= buckets <= flat.size:
        return None
    index, sign = position_hash(flat.size, buckets, seed)
    values = np.zeros(buckets, np.float32)
    values[index.numpy()[::-1]] = (flat * sign.numpy())[::-1]  # reversed: each bucket gets its first member's value
    if not np.array_equal(hashed_weight(values, flat.size, seed).view(np.uint32), flat.view(np.uint32)):
        return None
    return values

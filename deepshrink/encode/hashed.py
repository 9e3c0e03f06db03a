"""The HashedNets codec: a hashed layer's weight stored as its buckets plus the hash spec.

Virtual weight i of a hashed layer is ``sign(i) * bucket[h(i)]``, with ``h`` and
``sign`` seeded hashes of the position (Chen et al. 2015). The assignment costs no
storage: the archive keeps the float32 buckets, their count and the seed, and the
decoder recomputes the hash. The hash itself is ``core.hashing.position_hash``, shared with ``compress.share.hashing``.
"""

import numpy as np

from deepshrink.core.hashing import HASH, position_hash  # noqa: F401  (HASH names the hash in archive entries)


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

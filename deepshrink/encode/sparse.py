"""Deep Compression's relative indices for the non-zero positions of a flattened sparse tensor (Han et al. 2016).

Each stored entry holds a ``gap``: the number of positions skipped since the previous entry, so its position is
``previous + gap + 1``; the first entry counts from position -1 (a non-zero at position p has gap p). A gap must fit
``index_bits`` bits (at most ``2^index_bits - 1``); a longer run of zeros gets filler entries, each a zero weight
placed at the maximum gap (``previous + 2^index_bits``), as in the paper. Zeros after the last non-zero need no
entries: the decoder is told the tensor length.
"""

import numpy as np

from deepshrink.encode.container import DszError


def _gap_dtype(index_bits: int) -> type:
    return np.uint8 if index_bits <= 8 else np.uint16 if index_bits <= 16 else np.uint32


def encode_positions(flat_nonzero_mask: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps (smallest unsigned dtype that holds ``index_bits``) and a flag per entry marking fillers, which hold zero."""
    mask = np.asarray(flat_nonzero_mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"flat_nonzero_mask must be a bool array, got dtype {mask.dtype}")
    if not 1 <= index_bits <= 32:
        raise ValueError(f"index_bits must be in [1, 32], got {index_bits}")
    positions = np.flatnonzero(mask.reshape(-1))
    runs = np.diff(positions, prepend=-1) - 1  # zeros before each non-zero
    fillers = runs >> index_bits  # each filler covers 2^index_bits positions: max gap of zeros + itself
    real = np.cumsum(fillers + 1) - 1  # entry index of each true non-zero, after its fillers
    gaps = np.full(int(real[-1]) + 1 if len(real) else 0, (1 << index_bits) - 1, _gap_dtype(index_bits))
    gaps[real] = runs & ((1 << index_bits) - 1)
    is_filler = np.ones(len(gaps), bool)
    is_filler[real] = False
    return gaps, is_filler


def decode_positions(gaps: np.ndarray, length: int) -> np.ndarray:
    """Flat position (int64) of every entry, fillers included, so ``dense[positions] = values`` rebuilds the tensor."""
    gaps = np.asarray(gaps).reshape(-1)
    if gaps.size and (gaps.dtype.kind not in "iu" or gaps.min() < 0):
        raise DszError(f"corrupt sparse index: gaps must be non-negative integers (dtype {gaps.dtype})")
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if len(positions) and positions[-1] >= length:
        raise DszError(f"corrupt sparse index: gaps reach position {positions[-1]} of a tensor of {length}")
    return positions


def decode_mask(gaps: np.ndarray, is_filler: np.ndarray, length: int) -> np.ndarray:
    """The exact inverse of ``encode_positions``: the bool mask of true non-zeros (fillers dropped)."""
    positions = decode_positions(gaps, length)
    is_filler = np.asarray(is_filler, bool).reshape(-1)
    if is_filler.shape != positions.shape:
        raise DszError(f"corrupt sparse index: {len(is_filler)} filler flags for {len(positions)} entries")
    mask = np.zeros(length, bool)
    mask[positions[~is_filler]] = True
    return mask

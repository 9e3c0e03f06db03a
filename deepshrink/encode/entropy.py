"""Empirical entropy of integer symbol streams: the bound any coder here is measured against."""

import numpy as np

MAX_ALPHABET = 1 << 16


def check_symbols(symbols: np.ndarray, alphabet_size: int) -> np.ndarray:
    """Validate and flatten a stream of integers in ``[0, alphabet_size)``, so coders never index out of range."""
    if not 1 <= alphabet_size <= MAX_ALPHABET:
        raise ValueError(f"alphabet_size must be in [1, {MAX_ALPHABET}], got {alphabet_size}")
    symbols = np.asarray(symbols)
    if symbols.size == 0:
        return np.zeros(0, np.int64)
    if symbols.dtype.kind not in "iub":
        raise ValueError(f"symbols must be integers, got dtype {symbols.dtype}")
    flat = symbols.reshape(-1).astype(np.int64, copy=False)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= alphabet_size:
        raise ValueError(f"symbols must lie in [0, {alphabet_size}), got values in [{lo}, {hi}]")
    return flat


def symbol_counts(symbols: np.ndarray, alphabet_size: int) -> np.ndarray:
    """Occurrences of each alphabet symbol (int64, length ``alphabet_size``)."""
    return np.bincount(check_symbols(symbols, alphabet_size), minlength=alphabet_size).astype(np.int64)


def entropy_from_counts(counts: np.ndarray) -> float:
    """Shannon entropy in bits per symbol of the distribution ``counts / counts.sum()`` (0 for an empty stream)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return max(0.0, float(-(p * np.log2(p)).sum()))


def shannon_entropy_bits(symbols: np.ndarray, alphabet_size: int) -> float:
    """Empirical (order-0) entropy in bits per symbol: the floor for a static per-symbol code."""
    return entropy_from_counts(symbol_counts(symbols, alphabet_size))


def total_entropy_bits(symbols: np.ndarray, alphabet_size: int) -> float:
    """Empirical entropy of the whole stream in bits (count x bits per symbol)."""
    return np.asarray(symbols).size * shannon_entropy_bits(symbols, alphabet_size)

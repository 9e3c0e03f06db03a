"""rANS coding of integer symbol streams with ``constriction`` (a static model built from the data itself).

Unlike Huffman, ANS spends fractional bits per symbol, so a stream of 99% zeros costs ~0.08 bits per symbol instead of
Huffman's floor of 1. The header stores the symbols that occur and their (quantised) integer counts; encoder and
decoder both build the model from exactly those stored integers, so the two models are bit-identical.
"""

import struct
from dataclasses import dataclass

import constriction
import numpy as np

from deepshrink.encode._framing import pack_table, read_header, unpack_table
from deepshrink.encode.container import DszError
from deepshrink.encode.entropy import MAX_ALPHABET, check_symbols

PRECISION_BITS = 24  # constriction's default ANS models quantise probabilities to 24 bits
_MAGIC = b"DSRA"
_HEADER = struct.Struct("<4sIQII")  # magic, alphabet size, symbols, distinct symbols, packed table bytes
_WHAT = "rANS stream"


@dataclass(frozen=True, eq=False)
class RansStream:
    alphabet_size: int
    values: np.ndarray  # the distinct symbols that occur, ascending
    counts: np.ndarray  # their quantised counts (>= 1): the model both coder sides rebuild
    payload: bytes  # constriction AnsCoder words, uint32 little-endian; empty when <= 1 distinct symbol
    num_symbols: int

    @property
    def num_bits(self) -> int:
        return 8 * len(self.payload)

    def bits_per_symbol(self, include_header: bool = True) -> float:
        """Coded size per symbol: the whole serialised stream, or the payload alone."""
        bits = 8 * len(self.to_bytes()) if include_header else self.num_bits
        return bits / self.num_symbols if self.num_symbols else 0.0

    def to_bytes(self) -> bytes:
        table = pack_table(np.asarray(self.values, "<u2").tobytes() + np.asarray(self.counts, "<u4").tobytes())
        return _HEADER.pack(_MAGIC, self.alphabet_size, self.num_symbols, len(self.values), len(table)) + table + self.payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "RansStream":
        """Parse and validate; a truncated or corrupt stream raises DszError (a ValueError)."""
        data = bytes(data)
        alphabet, num_symbols, distinct, table_len = read_header(data, _HEADER, _MAGIC, _WHAT)
        if not 1 <= alphabet <= MAX_ALPHABET or distinct > alphabet:
            raise DszError(f"corrupt {_WHAT}: alphabet size {alphabet} with {distinct} distinct symbols")
        end = _HEADER.size + table_len
        if end > len(data):
            raise DszError(f"truncated {_WHAT} (frequency table needs {table_len} bytes, {len(data) - _HEADER.size} left)")
        table = unpack_table(data[_HEADER.size : end], 6 * distinct, f"{_WHAT} frequency table")
        values = np.frombuffer(table, "<u2", distinct).astype(np.int64)
        counts = np.frombuffer(table, "<u4", distinct, offset=2 * distinct).astype(np.int64)
        stream = cls(alphabet, values, counts, data[end:], num_symbols)
        _validate(stream)
        return stream


def quantise_counts(counts: np.ndarray) -> np.ndarray:
    """Counts as stored in the header: exact up to a total of 2^24, else rescaled to that total (keeping every
    occurring symbol >= 1). The coder's 24-bit probabilities could not use finer counts anyway."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total <= 1 << PRECISION_BITS:
        return counts
    scaled = np.rint(counts * ((1 << PRECISION_BITS) / total)).astype(np.int64)
    return np.where(counts > 0, np.maximum(scaled, 1), 0)


def _model(counts: np.ndarray) -> "constriction.stream.model.Categorical":
    """The one place the model is built, from the stored integers only, so both sides agree bit for bit."""
    return constriction.stream.model.Categorical(np.asarray(counts, np.float64), perfect=False)


def rans_encode(symbols: np.ndarray, alphabet_size: int) -> RansStream:
    """rANS-code a stream of integers in ``[0, alphabet_size)`` under its own empirical distribution."""
    flat = check_symbols(symbols, alphabet_size)
    counts = quantise_counts(np.bincount(flat, minlength=alphabet_size))
    values = np.flatnonzero(counts)
    payload = b""
    if len(values) > 1:  # a single distinct value is fully described by the header
        rank = np.zeros(alphabet_size, np.int32)
        rank[values] = np.arange(len(values), dtype=np.int32)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(rank[flat], _model(counts[values]))
        payload = coder.get_compressed().astype("<u4").tobytes()
    return RansStream(alphabet_size, values, counts[values], payload, len(flat))


def _validate(stream: RansStream) -> None:
    """Check the header fields against each other before any decoding work."""
    values, counts = np.asarray(stream.values, np.int64), np.asarray(stream.counts, np.int64)
    k, n = len(values), stream.num_symbols
    if values.ndim != 1 or counts.shape != values.shape or not 1 <= stream.alphabet_size <= MAX_ALPHABET:
        raise DszError(f"corrupt {_WHAT}: malformed frequency table")
    if k and (values[0] < 0 or values[-1] >= stream.alphabet_size or (np.diff(values) <= 0).any() or (counts < 1).any()):
        raise DszError(f"corrupt {_WHAT}: symbols must be ascending in [0, {stream.alphabet_size}) with counts >= 1")
    total = int(counts.sum())
    exact = n <= 1 << PRECISION_BITS  # counts are exact below 2^24 symbols, rescaled to that total above
    if n < 0 or (total != n if exact else abs(total - (1 << PRECISION_BITS)) > 2 * k):
        raise DszError(f"corrupt {_WHAT}: {n} symbols do not match the frequency table (total {total})")
    if len(stream.payload) % 4 or (k <= 1) != (len(stream.payload) == 0):
        raise DszError(f"corrupt or truncated {_WHAT}: payload of {len(stream.payload)} bytes for {k} distinct symbols")


def rans_decode(stream: RansStream) -> np.ndarray:
    """Decode to an int64 array; a corrupt stream raises DszError."""
    _validate(stream)
    values, n = np.asarray(stream.values, np.int64), stream.num_symbols
    if len(values) <= 1:
        return np.full(n, values[0] if n else 0, np.int64)
    words = np.frombuffer(stream.payload, "<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        ranks = coder.decode(_model(stream.counts), n)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise DszError(f"corrupt {_WHAT}: {exc}") from None
    if not coder.is_empty():  # a clean decode returns the coder exactly to its initial state
        raise DszError(f"corrupt {_WHAT}: payload does not decode to exactly {n} symbols")
    return values[ranks]


def rans_bits_per_symbol(symbols: np.ndarray, alphabet_size: int) -> float:
    """Size of the whole ``rans_encode`` stream (header included) in bits per symbol."""
    return rans_encode(symbols, alphabet_size).bits_per_symbol()

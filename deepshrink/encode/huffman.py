"""Canonical Huffman coding of integer symbol streams, vectorised with numpy (no Python loop per symbol).

Code lengths come from a two-queue Huffman build; if the longest exceeds ``max_len`` they are rebalanced with the
JPEG (ITU T.81, Annex K.3) procedure, which keeps a full prefix code. Only the lengths are stored: codes are
canonical (ordered by length, then symbol), so the decoder rebuilds them exactly.

Decoding treats every bit position as if a codeword started there: one lookup on the next L bits (L = longest code
in the stream) gives its length, hence ``nxt[i] = i + length``. The true codeword starts are the chain
0 -> nxt[0] -> ..., found by pointer doubling (jump tables nxt^(2^k)) in O(bits x log symbols) numpy work.
Lookups use a 2^L table for L <= ``LUT_BITS`` and, for longer codes, a search over the <= 24 per-length code ranges,
so memory stays O(bits) for any ``max_len`` up to ``MAX_CODE_LENGTH``.
"""

import struct
from dataclasses import dataclass

import numpy as np

from deepshrink.encode._framing import pack_table, read_header, unpack_table
from deepshrink.encode.container import DszError
from deepshrink.encode.entropy import MAX_ALPHABET, check_symbols

MAX_CODE_LENGTH = 24  # an L-bit window at any bit offset (L + 7 bits) must fit one 32-bit word
LUT_BITS = 16  # decode through a 2^L table up to this length (256 KiB of tables); above it, search code ranges
_MAGIC = b"DSHF"
_HEADER = struct.Struct("<4sIQQI")  # magic, alphabet size, symbols, payload bits, packed length-table bytes
_WHAT = "Huffman stream"


@dataclass(frozen=True, eq=False)
class HuffmanStream:
    lengths: np.ndarray  # uint8 code length per alphabet symbol; 0 = symbol absent
    payload: bytes  # codewords MSB-first, zero-padded to a whole byte
    num_symbols: int
    num_bits: int  # payload bits without the padding

    @property
    def alphabet_size(self) -> int:
        return len(self.lengths)

    def bits_per_symbol(self, include_header: bool = True) -> float:
        """Coded size per symbol: the whole serialised stream, or the payload bits alone."""
        bits = 8 * len(self.to_bytes()) if include_header else self.num_bits
        return bits / self.num_symbols if self.num_symbols else 0.0

    def to_bytes(self) -> bytes:
        table = pack_table(np.asarray(self.lengths, np.uint8).tobytes())
        return _HEADER.pack(_MAGIC, len(self.lengths), self.num_symbols, self.num_bits, len(table)) + table + self.payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "HuffmanStream":
        """Parse and validate; a truncated or corrupt stream raises DszError (a ValueError)."""
        data = bytes(data)
        alphabet, num_symbols, num_bits, table_len = read_header(data, _HEADER, _MAGIC, _WHAT)
        if not 1 <= alphabet <= MAX_ALPHABET:
            raise DszError(f"corrupt {_WHAT}: alphabet size {alphabet} not in [1, {MAX_ALPHABET}]")
        end = _HEADER.size + table_len
        if end > len(data):
            raise DszError(f"truncated {_WHAT} (code-length table needs {table_len} bytes, {len(data) - _HEADER.size} left)")
        lengths = np.frombuffer(unpack_table(data[_HEADER.size : end], alphabet, f"{_WHAT} code-length table"), np.uint8)
        stream = cls(lengths, data[end:], num_symbols, num_bits)
        _validate(stream)
        return stream


def code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length per symbol (uint8, 0 for count 0), at most ``max_len``; a lone symbol gets length 1."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or not 1 <= len(counts) <= MAX_ALPHABET or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise ValueError(f"counts must be a 1-D array of non-negative integers, 1 to {MAX_ALPHABET} long")
    if not 1 <= max_len <= MAX_CODE_LENGTH:
        raise ValueError(f"max_len must be in [1, {MAX_CODE_LENGTH}], got {max_len}")
    lengths = np.zeros(len(counts), np.uint8)
    present = np.flatnonzero(counts)
    if len(present) <= 1:
        lengths[present] = 1
        return lengths
    if len(present) > 1 << max_len:
        raise ValueError(f"{len(present)} distinct symbols cannot have codes of at most {max_len} bits")
    weights = counts[present].astype(np.int64)
    depths = _huffman_depths(weights[np.lexsort((present, weights))])
    per_length = _limit_lengths(np.bincount(depths).tolist(), max_len)
    # Any assignment of this multiset of lengths is a prefix code; shortest to most frequent is optimal.
    lengths[present[np.lexsort((present, -weights))]] = np.repeat(np.arange(len(per_length)), per_length)
    return lengths


def _huffman_depths(weights: list | np.ndarray) -> np.ndarray:
    """Leaf depths of a Huffman tree over ascending ``weights``: two queues (leaves, merged nodes), O(k)."""
    leaf, k = [int(w) for w in weights], len(weights)
    merged: list[int] = []
    parent = [0] * (2 * k - 1)  # nodes 0..k-1 are leaves, k + j is merged[j]; the root is 2k - 2
    i = j = 0
    for node in range(k, 2 * k - 1):
        total = 0
        for _ in range(2):
            if j >= len(merged) or (i < k and leaf[i] <= merged[j]):
                parent[i], total, i = node, total + leaf[i], i + 1
            else:
                parent[k + j], total, j = node, total + merged[j], j + 1
        merged.append(total)
    depth = [0] * (2 * k - 1)
    for node in range(2 * k - 3, k - 1, -1):  # a parent is always created after its children
        depth[node] = depth[parent[node]] + 1
    return np.asarray(depth)[np.asarray(parent[:k])] + 1


def _limit_lengths(per_length: list[int], max_len: int) -> list[int]:
    """Move leaves deeper than ``max_len`` up (JPEG Annex K.3): each step keeps the Kraft sum exactly 1."""
    bits = per_length + [0] * max(0, max_len + 1 - len(per_length))
    for depth in range(len(bits) - 1, max_len, -1):
        while bits[depth] > 0:
            j = depth - 2
            while bits[j] == 0:  # a shallower leaf exists while #symbols <= 2^max_len
                j -= 1
            bits[depth] -= 2  # two sibling leaves leave this depth:
            bits[depth - 1] += 1  # one takes their parent's place,
            bits[j] -= 1  # the other pairs with a leaf at depth j, which becomes an inner node
            bits[j + 1] += 2
    return bits[: max_len + 1]


def _code_ranges(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Symbols in canonical order (by length, then symbol), their lengths, and left-justified L-bit range starts."""
    lengths = np.asarray(lengths, np.int64)
    present = np.flatnonzero(lengths)
    order = present[np.argsort(lengths[present], kind="stable")]
    lens = lengths[order]
    top = int(lens.max()) if len(lens) else 0
    sizes = np.left_shift(1, top - lens)
    return order, lens, np.cumsum(sizes) - sizes, top


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code per symbol (uint32, read MSB-first over its length): code = cumulative Kraft sum, truncated."""
    codes = np.zeros(len(lengths), np.uint32)
    order, lens, starts, top = _code_ranges(lengths)
    codes[order] = starts >> (top - lens)
    return codes


def _pack_codes(codes: np.ndarray, lens: np.ndarray) -> tuple[bytes, int]:
    """Concatenate codewords MSB-first. Each code, shifted to its bit offset, spans <= 4 bytes; the codes' bits are
    disjoint, so summing their byte contributions (one weighted bincount per byte lane) is the same as OR-ing them."""
    ends = np.cumsum(lens, dtype=np.int64)
    num_bits = int(ends[-1]) if len(ends) else 0
    nbytes = (num_bits + 7) // 8
    starts = ends - lens
    word = codes.astype(np.int64) << (32 - lens - (starts & 7))
    first = starts >> 3
    acc = np.zeros(nbytes + 3)
    for lane in range((int(lens.max(initial=0)) + 14) // 8):  # bytes a code can touch: ceil((length + 7) / 8)
        acc += np.bincount(first + lane, weights=(word >> (24 - 8 * lane)) & 0xFF, minlength=nbytes + 3)
    return acc[:nbytes].astype(np.uint8).tobytes(), num_bits


def huffman_encode(symbols: np.ndarray, alphabet_size: int, max_len: int = MAX_CODE_LENGTH) -> HuffmanStream:
    """Huffman-code a stream of integers in ``[0, alphabet_size)`` with codes of at most ``max_len`` bits."""
    flat = check_symbols(symbols, alphabet_size)
    lengths = code_lengths(np.bincount(flat, minlength=alphabet_size), max_len)
    lens = lengths[flat].astype(np.int64)
    payload, num_bits = _pack_codes(canonical_codes(lengths)[flat], lens)
    return HuffmanStream(lengths, payload, len(flat), num_bits)


def _validate(stream: HuffmanStream) -> None:
    """Check the header fields against each other, so decoding can neither over-allocate nor misread."""
    lengths, n, bits = np.asarray(stream.lengths), stream.num_symbols, stream.num_bits
    if lengths.ndim != 1 or not 1 <= len(lengths) <= MAX_ALPHABET or lengths.dtype.kind not in "iu":
        raise DszError(f"corrupt {_WHAT}: code-length table must be 1 to {MAX_ALPHABET} integers")
    used = lengths[lengths > 0].astype(np.int64)
    if (lengths < 0).any() or (used > MAX_CODE_LENGTH).any():
        raise DszError(f"corrupt {_WHAT}: code lengths must be in [0, {MAX_CODE_LENGTH}]")
    if np.left_shift(1, MAX_CODE_LENGTH - used).sum() > 1 << MAX_CODE_LENGTH:
        raise DszError(f"corrupt {_WHAT}: code lengths violate the Kraft inequality (not a prefix code)")
    if len(stream.payload) != (bits + 7) // 8:
        raise DszError(f"corrupt or truncated {_WHAT}: payload is {len(stream.payload)} bytes, {bits} bits need {(bits + 7) // 8}")
    if n < 0 or bits < 0 or (n > 0 and (len(used) == 0 or not used.min() * n <= bits <= used.max() * n)) or (n == 0 and bits):
        raise DszError(f"corrupt {_WHAT}: {n} symbols cannot take {bits} bits with these code lengths")
    if bits % 8 and stream.payload[-1] & (0xFF >> (bits % 8)):
        raise DszError(f"corrupt {_WHAT}: padding bits after the last codeword are not zero")


def _windows(payload: bytes, num_bits: int, width: int) -> np.ndarray:
    """The ``width`` bits starting at every bit position (uint32, zero past the end): one shift of a 4-byte word."""
    raw = np.frombuffer(payload + bytes(4), np.uint8).astype(np.uint32)
    words = (raw[:-3] << 24) | (raw[1:-2] << 16) | (raw[2:-1] << 8) | raw[3:]
    shifts = (32 - width - np.arange(8)).astype(np.uint32)
    return ((words[: len(payload), None] >> shifts) & ((1 << width) - 1)).reshape(-1)[:num_bits]


def _chain(nxt: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` nodes of the walk 0 -> nxt[0] -> ...: with J = nxt^m known at the m found nodes, J gives the next
    m; then J <- J[J]. O(len(nxt) log n) vectorised work instead of n Python steps."""
    chain = np.zeros(n, nxt.dtype)
    jump, found = nxt, 1
    while found < n:
        step = min(found, n - found)
        chain[found : found + step] = jump[chain[:step]]
        found += step
        if found < n:
            jump = jump[jump]
    return chain


def _lookup(windows: np.ndarray, lens: np.ndarray, starts: np.ndarray, top: int) -> np.ndarray:
    """Decode a codeword at the head of each ``top``-bit window: ``rank << 5 | length`` (rank in canonical order),
    or 0 where no codeword matches (only possible for an incomplete code such as a lone symbol's)."""
    packed = (np.arange(len(lens)) << 5 | lens).astype(np.int32)
    sizes = np.left_shift(1, top - lens)
    if top <= LUT_BITS:  # canonical ranges tile [0, 2^top) in order: one table lookup per window
        table = np.zeros(1 << top, np.int32)
        table[: sizes.sum()] = np.repeat(packed, sizes)
        return table[windows]
    # Longer codes: the ranges of each distinct length are contiguous and aligned, so search the <= 24 length groups
    # and get the rank within a group by a shift.
    first = np.flatnonzero(np.r_[True, lens[1:] != lens[:-1]])
    shift = top - lens[first]
    base = first - (starts[first] >> shift)  # rank = base + (window >> shift) inside the group
    group_end = np.r_[starts[first[1:]], starts[-1] + sizes[-1]]
    group = np.searchsorted(group_end, windows, side="right")
    valid = group < len(first)
    group[~valid] = 0
    packed = (base[group] + (windows.astype(np.int64) >> shift[group])) << 5 | lens[first][group]
    return np.where(valid, packed, 0).astype(np.int32)


def huffman_decode(stream: HuffmanStream) -> np.ndarray:
    """Decode to an int64 array; a corrupt stream raises DszError (decoding work is bounded, it never hangs)."""
    _validate(stream)
    n, bits = stream.num_symbols, stream.num_bits
    if n == 0:
        return np.zeros(0, np.int64)
    order, lens, starts, top = _code_ranges(stream.lengths)
    packed = _lookup(_windows(stream.payload, bits, top), lens, starts, top)
    length_at = packed & 31
    index = np.int32 if bits < np.iinfo(np.int32).max else np.int64
    nxt = np.arange(bits, dtype=index) + length_at.astype(index)
    nxt[length_at == 0] = bits  # an invalid codeword leads to the sink `bits`, which maps to itself
    nxt = np.append(np.minimum(nxt, bits), index(bits))
    chain = _chain(nxt, n)
    last = int(chain[-1])
    if last >= bits or last + int(length_at[last]) != bits:
        raise DszError(f"corrupt {_WHAT}: the payload does not decode to exactly {n} codewords in {bits} bits")
    return order[packed[chain] >> 5]


def huffman_bits_per_symbol(symbols: np.ndarray, alphabet_size: int, max_len: int = MAX_CODE_LENGTH) -> float:
    """Payload bits per symbol that ``huffman_encode`` would produce (no header), without building the payload."""
    counts = np.bincount(check_symbols(symbols, alphabet_size), minlength=alphabet_size)
    total = counts.sum()
    return float((counts * code_lengths(counts, max_len)).sum() / total) if total else 0.0

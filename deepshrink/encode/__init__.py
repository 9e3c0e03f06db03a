"""Entropy-coding layer: entropy bounds, canonical Huffman, rANS, sparse relative indices and the .dsz archive.

Pure functions on numpy arrays; nothing here imports torch."""

from deepshrink.encode.container import DszError, pack_archive, read_archive, unpack_archive, write_archive
from deepshrink.encode.entropy import entropy_from_counts, shannon_entropy_bits, symbol_counts, total_entropy_bits
from deepshrink.encode.huffman import (
    HuffmanStream,
    canonical_codes,
    code_lengths,
    huffman_bits_per_symbol,
    huffman_decode,
    huffman_encode,
)
from deepshrink.encode.rans import RansStream, rans_bits_per_symbol, rans_decode, rans_encode
from deepshrink.encode.sparse import decode_mask, decode_positions, encode_positions

__all__ = [
    "DszError",
    "HuffmanStream",
    "RansStream",
    "canonical_codes",
    "code_lengths",
    "decode_mask",
    "decode_positions",
    "encode_positions",
    "entropy_from_counts",
    "huffman_bits_per_symbol",
    "huffman_decode",
    "huffman_encode",
    "pack_archive",
    "rans_bits_per_symbol",
    "rans_decode",
    "rans_encode",
    "read_archive",
    "shannon_entropy_bits",
    "symbol_counts",
    "total_entropy_bits",
    "unpack_archive",
    "write_archive",
]

"""Entropy coding on synthetic streams: entropy bounds, canonical Huffman, rANS, sparse relative indices, .dsz archive."""

import contextlib
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from deepshrink.core.errors import DeepShrinkError
from deepshrink.encode import (
    DszError,
    HuffmanStream,
    RansStream,
    canonical_codes,
    code_lengths,
    decode_mask,
    decode_positions,
    encode_positions,
    entropy_from_counts,
    huffman,
    huffman_bits_per_symbol,
    huffman_decode,
    huffman_encode,
    pack_archive,
    rans,
    rans_decode,
    rans_encode,
    read_archive,
    shannon_entropy_bits,
    symbol_counts,
    total_entropy_bits,
    unpack_archive,
    write_archive,
)

pytestmark = pytest.mark.unit

SIZES = [0, 1, 2, 1000, 200_000]
DISTRIBUTIONS = ["uniform", "geometric", "zipf"]


def sample(dist: str, n: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """``n`` symbols from a named distribution, and the alphabet size they are coded over."""
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        return rng.integers(0, 32, n), 32
    if dist == "geometric":
        return np.minimum(rng.geometric(0.3, n) - 1, 63), 64
    return np.minimum(rng.zipf(1.4, n) - 1, 4095), 4096


def fibonacci_counts(k: int) -> np.ndarray:
    """Counts whose Huffman tree is a path: the longest code is k - 1 bits."""
    fib = [1, 1]
    while len(fib) < k:
        fib.append(fib[-1] + fib[-2])
    return np.array(fib, np.int64)


def is_prefix_free(lengths: np.ndarray, codes: np.ndarray) -> bool:
    """Pairwise check, independent of how the codes were built: no code is a prefix of another."""
    present = np.flatnonzero(lengths)
    la, lb = lengths[present].astype(np.int64)[:, None], lengths[present].astype(np.int64)[None, :]
    ca, cb = codes[present].astype(np.int64)[:, None], codes[present].astype(np.int64)[None, :]
    shorter = (la <= lb) & ~np.eye(len(present), dtype=bool)
    return not (shorter & ((cb >> np.maximum(lb - la, 0)) == ca)).any()


def kraft_sum_scaled(lengths: np.ndarray) -> int:
    """Kraft sum x 2^24, exact."""
    used = lengths[lengths > 0].astype(np.int64)
    return int(np.left_shift(1, 24 - used).sum())


# --- entropy -----------------------------------------------------------------


def test_entropy_known_values():
    assert shannon_entropy_bits(np.array([0, 1, 2, 3]), 4) == pytest.approx(2.0)
    assert shannon_entropy_bits(np.array([5, 5, 5]), 8) == 0.0
    assert shannon_entropy_bits(np.array([], np.int64), 8) == 0.0
    assert shannon_entropy_bits(np.array([0, 0, 0, 1]), 2) == pytest.approx(0.8112781245)
    assert total_entropy_bits(np.array([0, 0, 0, 1]), 2) == pytest.approx(4 * 0.8112781245)
    assert entropy_from_counts(np.array([2, 0, 2])) == pytest.approx(1.0)
    assert symbol_counts(np.array([[1, 1], [3, 0]]), 5).tolist() == [1, 2, 0, 1, 0]


@pytest.mark.parametrize("bad", [np.array([0, 4]), np.array([-1, 0]), np.array([0.5, 1.0])])
def test_symbols_must_be_integers_in_the_alphabet(bad):
    with pytest.raises(ValueError, match="symbols must"):
        huffman_encode(bad, 4)
    with pytest.raises(ValueError, match="symbols must"):
        rans_encode(bad, 4)


# --- Huffman -----------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_huffman_round_trip(dist, n):
    x, alphabet = sample(dist, n)
    stream = huffman_encode(x, alphabet)
    restored = HuffmanStream.from_bytes(stream.to_bytes())
    y = huffman_decode(restored)
    assert y.dtype == np.int64 and np.array_equal(y, x)
    assert restored.num_bits == stream.num_bits == int((stream.lengths[x].astype(np.int64)).sum())
    assert len(stream.payload) == (stream.num_bits + 7) // 8


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_huffman_round_trip_through_range_search(monkeypatch, dist):
    """Codes longer than LUT_BITS decode by searching code ranges instead of a 2^L table: force that path."""
    monkeypatch.setattr(huffman, "LUT_BITS", 0)
    x, alphabet = sample(dist, 20_000, seed=1)
    assert np.array_equal(huffman_decode(huffman_encode(x, alphabet)), x)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_huffman_code_is_prefix_free_full_and_near_entropy(dist):
    x, alphabet = sample(dist, 20_000, seed=2)
    counts = symbol_counts(x, alphabet)
    lengths = code_lengths(counts)
    assert lengths.dtype == np.uint8 and ((lengths > 0) == (counts > 0)).all()
    assert is_prefix_free(lengths, canonical_codes(lengths))
    assert kraft_sum_scaled(lengths) == 1 << 24  # a full tree: Kraft equality
    entropy, mean = shannon_entropy_bits(x, alphabet), huffman_bits_per_symbol(x, alphabet)
    assert mean == pytest.approx((counts * lengths).sum() / counts.sum())
    assert entropy <= mean < entropy + 1
    assert huffman_encode(x, alphabet).bits_per_symbol(include_header=False) == pytest.approx(mean)


def test_canonical_codes_follow_length_then_symbol_order():
    lengths = np.array([3, 0, 2, 4, 2, 3, 4, 3, 0, 0], np.uint8)
    assert kraft_sum_scaled(lengths) == 1 << 24
    codes = canonical_codes(lengths)
    present = np.flatnonzero(lengths)
    order = present[np.lexsort((present, lengths[present]))]
    # The first code is all zeros; each next one is (previous + 1) shifted left by the length increase.
    assert codes[order[0]] == 0
    for prev, cur in zip(order[:-1], order[1:], strict=True):
        assert codes[cur] == (int(codes[prev]) + 1) << int(lengths[cur] - lengths[prev])
    assert codes[order[-1]] == (1 << int(lengths.max())) - 1  # a full code ends at all ones
    assert is_prefix_free(lengths, codes)


@pytest.mark.parametrize("max_len", [5, 8, 12, 16])
def test_length_limit_keeps_a_full_prefix_code(max_len):
    counts = np.concatenate([fibonacci_counts(30), np.zeros(3, np.int64)])  # unlimited: 29-bit codes
    free = code_lengths(counts, max_len=24)
    limited = code_lengths(counts, max_len=max_len)
    assert free.max() == 24 and limited.max() == max_len
    for lengths in (free, limited):
        assert kraft_sum_scaled(lengths) == 1 << 24
        assert is_prefix_free(lengths, canonical_codes(lengths))
        assert (lengths[-3:] == 0).all()
    optimal = (counts[:30] * np.r_[29, np.arange(29, 0, -1)]).sum()  # the unlimited tree is a path: depths 29, 29, 28, ..., 1
    assert optimal < (counts * free).sum() < (counts * limited).sum()


@pytest.mark.parametrize("max_len", [10, 18, 24])
def test_long_and_limited_codes_round_trip(max_len):
    counts = fibonacci_counts(22)  # unlimited depth 21 > LUT_BITS: the range-search decoder
    x = np.random.default_rng(3).permutation(np.repeat(np.arange(22), counts))
    stream = huffman_encode(x, 22, max_len=max_len)
    assert stream.lengths.max() == min(21, max_len)
    assert np.array_equal(huffman_decode(HuffmanStream.from_bytes(stream.to_bytes())), x)


def test_huffman_full_alphabet():
    x = np.random.default_rng(12).permutation(np.r_[np.arange(1 << 16), np.zeros(1 << 16, np.int64)])  # 0: half, others: 17 bits
    stream = huffman_encode(x, 1 << 16)
    assert stream.lengths.max() > huffman.LUT_BITS and kraft_sum_scaled(stream.lengths) == 1 << 24
    assert np.array_equal(huffman_decode(HuffmanStream.from_bytes(stream.to_bytes())), x)


def test_too_many_symbols_for_the_length_limit():
    with pytest.raises(ValueError, match="at most 8 bits"):
        huffman_encode(np.arange(300), 300, max_len=8)


def test_lone_symbol_and_empty_streams():
    lone = huffman_encode(np.full(50, 7), 10)
    assert lone.lengths.tolist() == [0] * 7 + [1, 0, 0] and lone.num_bits == 50 and lone.payload == bytes(7)
    assert np.array_equal(huffman_decode(HuffmanStream.from_bytes(lone.to_bytes())), np.full(50, 7))
    empty = huffman_encode(np.zeros(0, np.int64), 10)
    assert empty.num_bits == 0 and empty.payload == b"" and not empty.lengths.any()
    assert huffman_decode(HuffmanStream.from_bytes(empty.to_bytes())).shape == (0,)


def test_corrupt_huffman_payload_raises():
    lone = huffman_encode(np.full(50, 3), 4)  # code "0": any 1 bit is an invalid codeword
    flipped = bytearray(lone.payload)
    flipped[2] ^= 0x10
    with pytest.raises(DszError, match="corrupt Huffman stream"):
        huffman_decode(HuffmanStream(lone.lengths, bytes(flipped), 50, 50))
    x, alphabet = sample("geometric", 5000, seed=4)
    stream = huffman_encode(x, alphabet)
    with pytest.raises(DszError, match="exactly 4999 codewords"):
        huffman_decode(HuffmanStream(stream.lengths, stream.payload, 4999, stream.num_bits))
    with pytest.raises(DszError, match="padding"):  # 50 bits leave 6 padding bits in the last byte
        huffman_decode(HuffmanStream(lone.lengths, lone.payload[:-1] + b"\x01", 50, 50))


def test_random_payload_damage_never_hangs_or_escapes():
    """A full code decodes any bit string, so damage need not be detectable, but it must end in DszError or a
    stream of the declared length: never a hang, a crash or another exception."""
    x, alphabet = sample("zipf", 3000, seed=5)
    stream = huffman_encode(x, alphabet)
    rng = np.random.default_rng(6)
    for _ in range(40):
        damaged = bytearray(stream.payload)
        damaged[rng.integers(len(damaged))] ^= 1 << int(rng.integers(8))
        with contextlib.suppress(DszError):
            assert len(huffman_decode(HuffmanStream(stream.lengths, bytes(damaged), 3000, stream.num_bits))) == 3000


def test_corrupt_huffman_header_raises():
    x, alphabet = sample("uniform", 1000)
    data = huffman_encode(x, alphabet).to_bytes()
    for cut in (0, 5, 20, 30, len(data) - 1):
        with pytest.raises(DszError, match="Huffman stream"):
            HuffmanStream.from_bytes(data[:cut])
    with pytest.raises(DszError, match="magic"):
        HuffmanStream.from_bytes(b"XXXX" + data[4:])
    more = bytearray(data)
    struct.pack_into("<Q", more, 8, 10**6)  # symbol count no payload of this size can hold
    with pytest.raises(DszError, match="cannot take"):
        HuffmanStream.from_bytes(bytes(more))
    with pytest.raises(DszError, match="Kraft"):
        huffman_decode(HuffmanStream(np.array([1, 1, 1], np.uint8), b"\x00", 2, 2))


# --- rANS --------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_rans_round_trip(dist, n):
    x, alphabet = sample(dist, n)
    stream = rans_encode(x, alphabet)
    y = rans_decode(RansStream.from_bytes(stream.to_bytes()))
    assert y.dtype == np.int64 and np.array_equal(y, x)


def test_rans_single_value_empty_and_full_alphabet():
    for x, alphabet in [(np.full(1000, 9), 10), (np.zeros(1, np.int64), 1), (np.zeros(0, np.int64), 5)]:
        stream = rans_encode(x, alphabet)
        assert stream.payload == b""
        assert np.array_equal(rans_decode(RansStream.from_bytes(stream.to_bytes())), x)
    x = np.random.default_rng(7).integers(0, 1 << 16, 70_000)
    assert np.array_equal(rans_decode(RansStream.from_bytes(rans_encode(x, 1 << 16).to_bytes())), x)


@pytest.mark.parametrize("p_one", [0.01, 0.001])
def test_rans_beats_the_huffman_floor_on_skewed_bits(p_one):
    x = (np.random.default_rng(8).random(100_000) < p_one).astype(np.int64)
    entropy = shannon_entropy_bits(x, 2)
    stream = rans_encode(x, 2)
    assert np.array_equal(rans_decode(RansStream.from_bytes(stream.to_bytes())), x)
    assert stream.bits_per_symbol(include_header=False) < entropy + 0.05
    assert stream.bits_per_symbol() < entropy + 0.05 < 0.2  # header included
    assert huffman_encode(x, 2).bits_per_symbol(include_header=False) == 1.0


def test_rans_is_near_entropy_on_larger_alphabets():
    x, alphabet = sample("geometric", 200_000, seed=9)
    assert rans_encode(x, alphabet).bits_per_symbol() < shannon_entropy_bits(x, alphabet) + 0.01


def test_rans_rescales_counts_beyond_model_precision(monkeypatch):
    monkeypatch.setattr(rans, "PRECISION_BITS", 10)  # 2^10 instead of 2^24: rescaling kicks in at 5000 symbols
    x, alphabet = sample("zipf", 5000, seed=10)
    stream = rans_encode(x, alphabet)
    assert abs(int(stream.counts.sum()) - 1024) <= 2 * len(stream.values) and (stream.counts >= 1).all()
    assert np.array_equal(rans_decode(RansStream.from_bytes(stream.to_bytes())), x)


def test_corrupt_rans_stream_raises():
    x, alphabet = sample("geometric", 5000, seed=11)
    stream = rans_encode(x, alphabet)
    data = stream.to_bytes()
    for cut in (0, 10, 24, 40, len(data) - 1):
        with pytest.raises(DszError, match="rANS stream"):
            rans_decode(RansStream.from_bytes(data[:cut]))
    for at in (0, len(stream.payload) // 2, len(stream.payload) - 5):
        damaged = bytearray(stream.payload)
        damaged[at] ^= 0x04
        with pytest.raises(DszError, match="corrupt rANS stream"):
            rans_decode(RansStream(stream.alphabet_size, stream.values, stream.counts, bytes(damaged), stream.num_symbols))
    with pytest.raises(DszError, match="do not match the frequency table"):
        rans_decode(RansStream(stream.alphabet_size, stream.values, stream.counts, stream.payload, 4999))


# --- sparse relative indices -------------------------------------------------


def test_relative_index_worked_example():
    mask = np.zeros(16, bool)
    mask[[1, 12]] = True
    gaps, is_filler = encode_positions(mask, index_bits=2)  # max gap 3
    assert gaps.tolist() == [1, 3, 3, 2] and is_filler.tolist() == [False, True, True, False]
    assert decode_positions(gaps, 16).tolist() == [1, 5, 9, 12]
    assert np.array_equal(decode_mask(gaps, is_filler, 16), mask)


@pytest.mark.parametrize("index_bits", [3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.01])
def test_relative_index_round_trip(density, index_bits):
    mask = np.random.default_rng(index_bits).random(20_000) < density
    gaps, is_filler = encode_positions(mask, index_bits)
    assert gaps.dtype == np.uint8 and int(gaps.max(initial=0)) <= (1 << index_bits) - 1
    assert (gaps[is_filler] == (1 << index_bits) - 1).all()
    positions = decode_positions(gaps, len(mask))
    assert np.array_equal(positions[~is_filler], np.flatnonzero(mask))
    assert not mask[positions[is_filler]].any()  # fillers sit on zeros
    runs = np.diff(np.flatnonzero(mask), prepend=-1) - 1
    assert is_filler.sum() == (runs >> index_bits).sum()
    assert np.array_equal(decode_mask(gaps, is_filler, len(mask)), mask)


def test_relative_index_edge_cases():
    gaps, is_filler = encode_positions(np.zeros(100, bool), 3)
    assert len(gaps) == 0 and not decode_mask(gaps, is_filler, 100).any()
    gaps, is_filler = encode_positions(np.ones(100, bool), 3)
    assert (gaps == 0).all() and not is_filler.any() and decode_mask(gaps, is_filler, 100).all()
    mask = np.zeros(1000, bool)
    mask[[999]] = True  # 999 leading zeros: 124 fillers at 3 bits, then gap 7
    gaps, is_filler = encode_positions(mask, 3)
    assert is_filler.sum() == 124 and gaps[-1] == 7 and np.array_equal(decode_mask(gaps, is_filler, 1000), mask)
    mask = np.zeros(20, bool)
    mask[[0, 9]] = True  # a run of exactly 8 zeros: one filler, then gap 0
    gaps, is_filler = encode_positions(mask, 3)
    assert gaps.tolist() == [0, 7, 0] and np.array_equal(decode_mask(gaps, is_filler, 20), mask)
    with pytest.raises(DszError, match="sparse index"):
        decode_positions(np.array([5, 5], np.uint8), 10)
    with pytest.raises(ValueError, match="bool"):
        encode_positions(np.array([0, 1]), 3)


# --- .dsz container ----------------------------------------------------------

MANIFEST = {"model": "lenet5", "format": {"weights": "huffman"}, "bits": [4, 8], "scale": 0.125, "note": "ünïcode"}
STREAMS = {"conv1.weight": bytes(range(256)) * 3, "empty": b"", "fc.index": b"\x01\x02\x03"}


def raw_archive(meta: bytes, body: bytes = b"", version: int = 1) -> bytes:
    """An archive with arbitrary manifest bytes but valid framing and trailer checksum."""
    head = b"DSZ\x00" + struct.pack("<HI", version, len(meta)) + meta + body
    return head + hashlib.sha256(head).digest()


def test_archive_round_trip():
    data = pack_archive(MANIFEST, STREAMS)
    assert data[:4] == b"DSZ\x00" and struct.unpack_from("<H", data, 4)[0] == 1
    manifest, streams = unpack_archive(data)
    assert manifest == MANIFEST and streams == STREAMS and list(streams) == list(STREAMS)
    listed = json.loads(data[10 : 10 + struct.unpack_from("<I", data, 6)[0]])["streams"]
    assert [(s["name"], s["offset"], s["length"]) for s in listed] == [("conv1.weight", 0, 768), ("empty", 768, 0), ("fc.index", 768, 3)]
    assert unpack_archive(pack_archive({}, {})) == ({}, {})


def test_archive_carries_coded_streams():
    x, alphabet = sample("zipf", 10_000)
    manifest, streams = unpack_archive(
        pack_archive({"alphabet": alphabet}, {"h": huffman_encode(x, alphabet).to_bytes(), "r": rans_encode(x, alphabet).to_bytes()})
    )
    assert np.array_equal(huffman_decode(HuffmanStream.from_bytes(streams["h"])), x)
    assert np.array_equal(rans_decode(RansStream.from_bytes(streams["r"])), x)


def test_archive_rejects_bad_manifests_at_pack_time():
    with pytest.raises(ValueError, match="reserved"):
        pack_archive({"streams": []}, {})
    with pytest.raises(ValueError, match="plain JSON"):
        pack_archive({"x": float("nan")}, {})
    with pytest.raises(ValueError, match="plain JSON"):
        pack_archive({"x": object()}, {})


def test_every_single_byte_corruption_is_detected():
    data = pack_archive(MANIFEST, {"a": b"payload-a" * 4, "b": b"\x00\xff" * 8})
    for at in range(len(data)):
        damaged = bytearray(data)
        damaged[at] ^= 0x20
        with pytest.raises(DszError):
            unpack_archive(bytes(damaged))


def test_corruption_messages_name_the_problem():
    data = pack_archive(MANIFEST, STREAMS)
    section = len(data) - 32 - len(STREAMS["fc.index"])
    damaged = bytearray(data)
    damaged[section - 10] ^= 1  # inside conv1.weight
    with pytest.raises(DszError, match="checksum mismatch in stream 'conv1.weight'"):
        unpack_archive(bytes(damaged))
    damaged = bytearray(data)
    damaged[-1] ^= 1
    with pytest.raises(DszError, match="file checksum mismatch"):
        unpack_archive(bytes(damaged))
    damaged = bytearray(data)
    damaged[data.index(b"lenet5")] ^= 1  # manifest text: still valid JSON, caught by the trailer
    with pytest.raises(DszError, match="file checksum mismatch"):
        unpack_archive(bytes(damaged))
    with pytest.raises(DszError, match="bad magic|not a .dsz"):
        unpack_archive(b"PK\x03\x04" + data[4:])
    with pytest.raises(DszError, match=r"unsupported .dsz format version 2 \(this deepshrink reads version 1\)"):
        unpack_archive(data[:4] + struct.pack("<H", 2) + data[6:])


@pytest.mark.parametrize("cut", [0, 3, 9, 10, 60, -40, -33, -1])
def test_truncated_archive_raises(cut):
    data = pack_archive(MANIFEST, STREAMS)
    with pytest.raises(DszError, match="truncated|out of range|checksum|JSON"):
        unpack_archive(data[:cut])


def test_malformed_manifest_with_valid_checksums_raises():
    with pytest.raises(DszError, match="not valid JSON"):
        unpack_archive(raw_archive(b"{not json"))
    with pytest.raises(DszError, match="JSON object"):
        unpack_archive(raw_archive(b"[1, 2]"))
    with pytest.raises(DszError, match="not valid JSON"):
        unpack_archive(raw_archive(b"[" * 100_000))
    entry = {"name": "w", "offset": 0, "length": 10, "sha256": hashlib.sha256(b"abc").hexdigest()}
    with pytest.raises(DszError, match="'w'.*out of range"):
        unpack_archive(raw_archive(json.dumps({"streams": [entry]}).encode(), b"abc"))
    with pytest.raises(DszError, match="accounts for 0"):
        unpack_archive(raw_archive(b'{"streams": []}', b"extra"))
    with pytest.raises(DszError, match="malformed stream table"):
        unpack_archive(raw_archive(b'{"streams": [{"name": "w", "offset": "0"}]}'))


def test_write_and_read_archive(tmp_path: Path):
    path = write_archive(tmp_path / "model.dsz", MANIFEST, STREAMS)
    assert os.listdir(tmp_path) == ["model.dsz"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp file's 0600
    assert read_archive(path) == (MANIFEST, STREAMS)
    write_archive(path, {"v": 2}, {})  # overwrite in place
    assert read_archive(path) == ({"v": 2}, {}) and os.listdir(tmp_path) == ["model.dsz"]
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DszError, match="model.dsz: "):
        read_archive(path)
    with pytest.raises(DszError, match="missing.dsz: file not found"):
        read_archive(tmp_path / "missing.dsz")


def test_failed_write_keeps_the_old_archive(tmp_path: Path, monkeypatch):
    path = write_archive(tmp_path / "model.dsz", MANIFEST, STREAMS)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_archive(path, {"v": 2}, {})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.dsz"] and read_archive(path) == (MANIFEST, STREAMS)


def test_dsz_error_is_a_deepshrink_value_error():
    assert issubclass(DszError, DeepShrinkError) and issubclass(DszError, ValueError)

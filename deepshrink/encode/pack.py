"""``pack``/``unpack``: a model's state dict as a ``.dsz`` archive, restored bit-exactly.

Any float tensor with at most 256 distinct non-zero values (weights after
k-means sharing or quantization) is stored as a float32 codebook plus
entropy-coded cluster indices; if it has zeros, the smaller of two layouts is
kept: dense indices with a "zero" symbol, or Deep Compression's sparse layout
(relative position gaps with fillers + indices of the non-zeros only). Each
symbol stream is coded with canonical Huffman or rANS, whichever is smaller.
A HashedNets layer (the model's ``hash_specs``) is stored as its buckets and hash
spec (``encode.hashed``) when its weight still hashes back exactly. Every other
tensor is stored raw. The manifest is JSON and names an
architecture (a zoo model or a ``module:function``), never code to execute.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepshrink.encode.container import DszError, manifest_share, read_archive, write_archive
from deepshrink.encode.entropy import total_entropy_bits
from deepshrink.encode.hashed import HASH, buckets_of, hashed_weight
from deepshrink.encode.huffman import HuffmanStream, huffman_decode, huffman_encode
from deepshrink.encode.rans import RansStream, rans_decode, rans_encode
from deepshrink.encode.sparse import decode_positions, encode_positions

FORMAT = "deepshrink.dsz/1"
MAX_CODEBOOK = 256
INDEX_BITS = (2, 3, 4, 5, 6, 7, 8)
_DTYPES = {
    torch.float32: "<f4",
    torch.float16: "<f2",
    torch.int64: "<i8",
    torch.int32: "<i4",
    torch.uint8: "|u1",
    torch.int8: "|i1",
    torch.bool: "|b1",
}
_TORCH_DTYPES = {str(t).removeprefix("torch."): t for t in _DTYPES}


@dataclass(frozen=True)
class TensorStats:
    name: str
    codec: str
    numel: int
    bytes: int  # coded bytes of all this tensor's streams
    entropy_bits: float  # Shannon bound of its symbol streams (raw payload bits for raw tensors)
    fixed_width_bytes: float  # the same layout with fixed-width fields, before entropy coding

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class PackReport:
    path: Path
    file_bytes: int
    tensors: list[TensorStats]
    archive_bytes: dict[str, int] = field(default_factory=dict)  # per tensor: see ``tensor_archive_bytes``

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def fixed_width_bytes(self) -> float:
        return sum(t.fixed_width_bytes for t in self.tensors)


# -- symbol streams: Huffman or rANS, whichever is smaller --------------------
def code_symbols(symbols: np.ndarray, alphabet: int) -> tuple[str, bytes]:
    huffman = huffman_encode(symbols, alphabet).to_bytes()
    rans = rans_encode(symbols, alphabet).to_bytes()
    return ("huffman", huffman) if len(huffman) <= len(rans) else ("rans", rans)


def decode_symbols(codec: str, data: bytes) -> np.ndarray:
    if codec == "huffman":
        return huffman_decode(HuffmanStream.from_bytes(data))
    if codec == "rans":
        return rans_decode(RansStream.from_bytes(data))
    raise DszError(f"unknown stream codec {codec!r}")


# -- per-tensor layouts ----------------------------------------------------------
def _sparse_gaps(nonzero: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray, str, bytes]]:
    """For every candidate index width: (bits, gaps, is_filler, gap codec, coded gaps)."""
    out = []
    for bits in INDEX_BITS:
        gaps, is_filler = encode_positions(nonzero, bits)
        out.append((bits, gaps, is_filler, *code_symbols(gaps.astype(np.int64), 1 << bits)))
    return out


def _encode_codebook(flat: np.ndarray, codebook: np.ndarray) -> tuple[dict, dict[str, bytes], float, float]:
    """Best codebook layout for ``flat`` (float32); returns (entry, streams, entropy bits, fixed-width bytes)."""
    k = len(codebook)
    symbol_bits = max(1, int(np.ceil(np.log2(k + 1))))
    nonzero = flat != 0
    symbols = np.searchsorted(codebook, flat).astype(np.int64)
    dense_symbols = np.where(nonzero, symbols, k)  # symbol k stands for zero
    codec, data = code_symbols(dense_symbols, k + 1)
    fixed = flat.size * symbol_bits / 8 + 4 * k
    candidates = [({"layout": "dense", "index": codec}, {"index": data}, total_entropy_bits(dense_symbols, k + 1), fixed)]
    if not nonzero.all():
        for bits, gaps, is_filler, gap_codec, gap_data in _sparse_gaps(nonzero):
            entries = np.full(len(gaps), k, np.int64)
            entries[~is_filler] = symbols[nonzero]
            index_codec, index_data = code_symbols(entries, k + 1)
            entropy = total_entropy_bits(gaps.astype(np.int64), 1 << bits) + total_entropy_bits(entries, k + 1)
            entry = {"layout": "sparse", "index_bits": bits, "gaps": gap_codec, "index": index_codec}
            fixed = len(gaps) * (bits + symbol_bits) / 8 + 4 * k
            candidates.append((entry, {"gaps": gap_data, "index": index_data}, entropy, fixed))
    return min(candidates, key=lambda c: sum(len(v) for v in c[1].values()))


def _encode_sparse_raw(flat: np.ndarray) -> tuple[dict, dict[str, bytes], float, float]:
    """Non-zero values stored raw at coded relative positions (a pruned but unshared tensor)."""
    nonzero = flat != 0
    # Total size: a narrower index width codes gaps in fewer bits but adds fillers, each a 4-byte raw value.
    bits, gaps, is_filler, gap_codec, gap_data = min(_sparse_gaps(nonzero), key=lambda c: len(c[4]) + 4 * len(c[1]))
    values = np.zeros(len(gaps), flat.dtype)
    values[~is_filler] = flat[nonzero]
    raw = values.astype("<f4").tobytes()
    entropy = total_entropy_bits(gaps.astype(np.int64), 1 << bits) + 8 * len(raw)
    entry = {"layout": "sparse_raw", "index_bits": bits, "gaps": gap_codec}
    return entry, {"gaps": gap_data, "values": raw}, entropy, len(gaps) * (bits + 32) / 8


def _distinct_nonzero(flat: np.ndarray) -> np.ndarray | None:
    values = np.unique(flat[flat != 0])
    return values if len(values) <= MAX_CODEBOOK else None


def _encode_hashed(entry: dict, flat: np.ndarray, spec: dict) -> tuple[dict, dict[str, bytes], TensorStats] | None:
    """The buckets and hash spec of a hashed weight; None if the weight no longer hashes back exactly."""
    values = buckets_of(flat, int(spec["buckets"]), int(spec["seed"])) if spec.get("hash") == HASH else None
    if values is None:
        return None
    entry.update(codec="hashed", buckets=len(values), seed=int(spec["seed"]), hash=HASH)
    data = values.astype("<f4").tobytes()
    return entry, {"buckets": data}, TensorStats(entry["name"], "hashed", flat.size, len(data), 8.0 * len(data), float(len(data)))


def encode_tensor(name: str, tensor: torch.Tensor, hash_spec: dict | None = None) -> tuple[dict, dict[str, bytes], TensorStats]:
    if tensor.dtype not in _DTYPES:
        raise DszError(f"tensor {name!r}: dtype {tensor.dtype} is not supported by the .dsz format")
    array = tensor.detach().cpu().contiguous().numpy()
    entry = {"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    raw = array.astype(_DTYPES[tensor.dtype], copy=False).tobytes()
    flat = array.reshape(-1)
    hashed = _encode_hashed(entry, flat, hash_spec) if hash_spec else None
    if hashed is not None:
        return hashed
    # Only +0.0 may be left out of a codebook/sparse layout: -0.0 would come back as +0.0.
    compressible = tensor.dtype == torch.float32 and tensor.numel() >= 64 and not np.signbit(flat[flat == 0]).any()
    if compressible:
        codebook = _distinct_nonzero(flat)
        if codebook is not None:
            layout, streams, entropy, fixed = _encode_codebook(flat, codebook)
            streams["codebook"] = codebook.astype("<f4").tobytes()
            codec = "codebook"
        else:
            layout, streams, entropy, fixed = _encode_sparse_raw(flat) if (flat == 0).any() else ({}, {}, 0.0, 0.0)
            codec = "sparse"
        coded = sum(len(v) for v in streams.values())
        if streams and coded < len(raw):
            entry.update(codec=codec, **layout)
            return entry, streams, TensorStats(name, f"{codec}/{layout['layout']}", tensor.numel(), coded, entropy, fixed)
    entry["codec"] = "raw"
    return entry, {"raw": raw}, TensorStats(name, "raw", tensor.numel(), len(raw), 8.0 * len(raw), float(len(raw)))


def decode_tensor(entry: dict, streams: dict[str, bytes]) -> torch.Tensor:
    name, shape = entry["name"], tuple(entry["shape"])
    if entry["dtype"] not in _TORCH_DTYPES:
        raise DszError(f"tensor {name!r}: unsupported dtype {entry['dtype']!r}")
    dtype = _TORCH_DTYPES[entry["dtype"]]
    numel = int(np.prod(shape, dtype=np.int64))
    if entry["codec"] == "raw":
        array = np.frombuffer(streams["raw"], _DTYPES[dtype])
        if array.size != numel:
            raise DszError(f"tensor {name!r}: {array.size} stored values for shape {list(shape)}")
        return torch.from_numpy(array.copy()).view(shape)
    if entry["codec"] == "sparse":
        positions = decode_positions(decode_symbols(entry["gaps"], streams["gaps"]), numel)
        values = np.frombuffer(streams["values"], "<f4")
        if positions.size != values.size:
            raise DszError(f"tensor {name!r}: {positions.size} positions for {values.size} values")
        flat = np.zeros(numel, np.float32)
        flat[positions] = values
        return torch.from_numpy(flat).view(shape)
    if entry["codec"] == "hashed":
        return _decode_hashed(entry, streams["buckets"], numel).view(shape)
    if entry["codec"] != "codebook":
        raise DszError(f"tensor {name!r}: unknown codec {entry['codec']!r}")
    codebook = np.frombuffer(streams["codebook"], "<f4")
    values = np.append(codebook, np.float32(0))  # symbol k decodes to zero
    symbols = decode_symbols(entry["index"], streams["index"])
    if symbols.size and symbols.max() > len(codebook):
        raise DszError(f"tensor {name!r}: cluster index out of range")
    flat = np.zeros(numel, np.float32)
    if entry["layout"] == "dense":
        if symbols.size != numel:
            raise DszError(f"tensor {name!r}: {symbols.size} indices for {numel} weights")
        flat = values[symbols]
    else:
        positions = decode_positions(decode_symbols(entry["gaps"], streams["gaps"]), numel)
        if positions.size != symbols.size:
            raise DszError(f"tensor {name!r}: {positions.size} positions for {symbols.size} indices")
        flat[positions] = values[symbols]
    return torch.from_numpy(flat.astype(np.float32)).view(shape)


def _decode_hashed(entry: dict, data: bytes, numel: int) -> torch.Tensor:
    if entry.get("hash") != HASH:
        raise DszError(f"tensor {entry['name']!r}: unknown hash {entry.get('hash')!r} (this version reads {HASH})")
    buckets = np.frombuffer(data, "<f4")
    if buckets.size != entry["buckets"] or not 1 <= buckets.size <= max(numel, 1):
        raise DszError(f"tensor {entry['name']!r}: {buckets.size} stored buckets, the entry says {entry['buckets']}")
    return torch.from_numpy(hashed_weight(buckets, numel, int(entry["seed"])))


# -- the model archive -------------------------------------------------------------
def add_streams(entry: dict, name: str, tensor_streams: dict[str, bytes], streams: dict[str, bytes]) -> dict:
    """File a tensor's coded streams in the archive's table as ``name:kind`` and record those keys in its entry."""
    entry["streams"] = {}
    for kind, data in tensor_streams.items():
        streams[f"{name}:{kind}"] = data
        entry["streams"][kind] = f"{name}:{kind}"
    return entry


def tensor_archive_bytes(entry: dict, tensor_streams: dict[str, bytes]) -> int:
    """What one tensor adds to a .dsz file: its coded streams plus its share of the manifest (``entry`` as filed
    by ``add_streams``). The file is the sum over its tensors plus a fixed header and architecture."""
    return sum(len(data) for data in tensor_streams.values()) + manifest_share(entry)


def pack(model: nn.Module | dict[str, torch.Tensor], path: str | Path, architecture: dict | None = None) -> PackReport:
    """Write ``model``'s state dict to ``path`` (.dsz); ``architecture`` lets ``unpack`` rebuild the model,
    e.g. ``{"zoo": "lenet300"}`` or ``{"module": "pkg.mod:build"}``."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    hash_specs = getattr(model, "hash_specs", None) or {}  # set by HashShare: its layers pack as buckets
    entries, streams, stats, sizes = [], {}, [], {}
    for name, tensor in state.items():
        entry, tensor_streams, tensor_stats = encode_tensor(name, tensor, hash_specs.get(name))
        entries.append(add_streams(entry, name, tensor_streams, streams))
        stats.append(tensor_stats)
        sizes[name] = tensor_archive_bytes(entries[-1], tensor_streams)
    manifest = {"format": FORMAT, "architecture": architecture, "tensors": entries}
    path = write_archive(path, manifest, streams)
    return PackReport(Path(path), Path(path).stat().st_size, stats, sizes)


def unpack_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The archive's tensors (exactly as packed) and its manifest."""
    manifest, streams = read_archive(path)
    if manifest.get("format") != FORMAT:
        raise DszError(f"{path}: format {manifest.get('format')!r} is not supported (expected {FORMAT})")
    state = {}
    for entry in manifest.get("tensors", []):
        try:
            tensor_streams = {kind: streams[key] for kind, key in entry["streams"].items()}
            state[entry["name"]] = decode_tensor(entry, tensor_streams)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DszError):
                raise DszError(f"{path}: {exc}") from None
            raise DszError(
                f"{path}: corrupt manifest entry for tensor {entry.get('name', '?') if isinstance(entry, dict) else '?'} ({exc!r})"
            ) from None
    return state, manifest


def unpack(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the packed model: into ``model`` if given, else from the archive's architecture entry."""
    from deepshrink.models.weights import resize_to_state_dict

    state, manifest = unpack_state(path)
    if model is None:
        from deepshrink.models import build_architecture

        # A channel-pruned model is smaller than its architecture entry; a model the caller gives must fit as is.
        model = resize_to_state_dict(build_architecture(manifest.get("architecture")), state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DszError(f"{path}: archive does not match the model ({str(exc).splitlines()[0]})") from None
    return model.eval()


def pack_verified(model: nn.Module, path: str | Path, architecture: dict | None = None) -> tuple[PackReport, nn.Module]:
    """``pack``, then decode the file into a copy of ``model`` and check every tensor came back
    exactly; returns the report and the decoded model (what the file really holds)."""
    report = pack(model, path, architecture)
    decoded = unpack(report.path, copy.deepcopy(model))
    restored = decoded.state_dict()
    for name, tensor in model.state_dict().items():
        if not torch.equal(tensor, restored[name]):
            raise RuntimeError(f"pack/unpack round trip changed tensor {name!r}")  # a bug, never user error
    return report, decoded

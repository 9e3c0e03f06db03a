"""An ONNX model's initializers as a ``.dsz`` archive, restored to the identical model.

The graph (nodes, attributes, initializer names/types/shapes, no values) is one
zstd-compressed protobuf stream. Float32 initializers go through the PyTorch
archive's own per-tensor coder (``encode/pack.py``: codebook + Huffman/rANS
indices after k-means sharing, coded sparse positions after pruning, raw
otherwise); integer initializers (int8/int4 weight codes, int32 biases, zero
points) are offset to symbols 0..k-1 and coded the same way when that is
smaller than their raw bytes. Other tensors stay inside the graph stream.
``unpack_onnx`` rebuilds every initializer bit for bit, in ``raw_data`` form,
so ``unpack_onnx(pack_onnx(m))`` serialises like ``normalize_initializers(m)``.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import zstandard
from onnx import helper, numpy_helper

from deepshrink.core.methods import Context, backend
from deepshrink.encode.container import DszError, read_archive, write_archive
from deepshrink.encode.entropy import total_entropy_bits
from deepshrink.encode.pack import TensorStats, add_streams, code_symbols, decode_symbols, decode_tensor, encode_tensor
from deepshrink.encode.step import Pack
from deepshrink.onnx_in.model import OnnxModelError, check_onnx, normalize_initializers

FORMAT = "deepshrink.onnx-dsz/1"
ZSTD_LEVEL = 19
MAX_ALPHABET = 1 << 16  # integer tensors with a wider value range stay raw
_INTEGER_TYPES = {
    onnx.TensorProto.INT8: "<i1",
    onnx.TensorProto.UINT8: "<u1",
    onnx.TensorProto.INT16: "<i2",
    onnx.TensorProto.UINT16: "<u2",
    onnx.TensorProto.INT32: "<i4",
    onnx.TensorProto.INT64: "<i8",
}
_INT4_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


@dataclass(frozen=True)
class OnnxPackReport:
    path: Path
    file_bytes: int
    graph_bytes: int  # the compressed graph stream
    tensors: list[TensorStats]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


def _codable(tensor: onnx.TensorProto) -> bool:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.HasField("segment"):
        return False
    return tensor.data_type == onnx.TensorProto.FLOAT or tensor.data_type in _INTEGER_TYPES or tensor.data_type in _INT4_TYPES


def _int4_values(tensor: onnx.TensorProto) -> np.ndarray:
    """int4/uint4 codes as plain integers (numpy has no 4-bit type)."""
    return numpy_helper.to_array(tensor).astype(np.int8)


def _encode_integers(name: str, values: np.ndarray, raw: bytes) -> tuple[dict, dict[str, bytes], TensorStats]:
    """Symbols ``values - min`` coded with Huffman or rANS when smaller than ``raw``."""
    flat = values.reshape(-1).astype(np.int64)
    if flat.size:
        low = int(flat.min())
        alphabet = int(flat.max()) - low + 1
        if alphabet <= MAX_ALPHABET:
            codec, data = code_symbols(flat - low, alphabet)
            if len(data) < len(raw):
                entropy = total_entropy_bits(flat - low, alphabet)
                stats = TensorStats(
                    name, f"symbols/{codec}", flat.size, len(data), entropy, flat.size * np.ceil(np.log2(max(alphabet, 2))) / 8
                )
                return {"codec": "symbols", "index": codec, "offset": low}, {"symbols": data}, stats
    return {"codec": "raw"}, {"raw": raw}, TensorStats(name, "raw", flat.size, len(raw), 8.0 * len(raw), float(len(raw)))


def _encode_initializer(tensor: onnx.TensorProto) -> tuple[dict, dict[str, bytes], TensorStats]:
    entry = {"name": tensor.name, "data_type": int(tensor.data_type), "dims": [int(d) for d in tensor.dims]}
    if tensor.data_type == onnx.TensorProto.FLOAT:
        array = numpy_helper.to_array(tensor)
        if np.isfinite(array).all():
            coded, streams, stats = encode_tensor(tensor.name, torch.from_numpy(np.array(array, np.float32)))
            return {**entry, "float": coded}, streams, stats
        raw = array.astype("<f4").tobytes()
        return (
            {**entry, "codec": "raw"},
            {"raw": raw},
            TensorStats(tensor.name, "raw", array.size, len(raw), 8.0 * len(raw), float(len(raw))),
        )
    if tensor.data_type in _INT4_TYPES:
        values = _int4_values(tensor)
        coded, streams, stats = _encode_integers(tensor.name, values, values.tobytes())  # raw fallback: one byte per code
        return {**entry, **coded}, streams, stats
    array = numpy_helper.to_array(tensor)
    coded, streams, stats = _encode_integers(tensor.name, array, array.astype(_INTEGER_TYPES[tensor.data_type]).tobytes())
    return {**entry, **coded}, streams, stats


def _strip(model: onnx.ModelProto, names: set[str]) -> bytes:
    """The model with the values of the initializers in ``names`` removed (names, types and dims kept)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for tensor in skeleton.graph.initializer:
        if tensor.name in names:
            kept = (tensor.name, tensor.data_type, list(tensor.dims))
            tensor.Clear()
            tensor.name, tensor.data_type = kept[0], kept[1]
            tensor.dims.extend(kept[2])
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(skeleton.SerializeToString())


def pack_onnx(model: onnx.ModelProto, path: str | Path) -> OnnxPackReport:
    """Write ``model`` as a .dsz archive (atomically)."""
    entries, streams, stats = [], {}, []
    coded = {t.name for t in model.graph.initializer if _codable(t)}
    if len(coded) != sum(1 for t in model.graph.initializer if t.name in coded):
        raise OnnxModelError("pack: initializer names must be unique")
    for tensor in model.graph.initializer:
        if tensor.name not in coded:
            continue
        entry, tensor_streams, tensor_stats = _encode_initializer(tensor)
        entries.append(add_streams(entry, tensor.name, tensor_streams, streams))
        stats.append(tensor_stats)
    graph = _strip(model, coded)
    streams["graph"] = graph
    manifest = {"format": FORMAT, "initializers": entries, "graph": "graph"}
    path = write_archive(path, manifest, streams)
    return OnnxPackReport(Path(path), Path(path).stat().st_size, len(graph), stats)


# -- restore ---------------------------------------------------------------------------------
def _integer_values(entry: dict, streams: dict[str, bytes], numel: int, raw_dtype: str) -> np.ndarray:
    if entry["codec"] == "raw":
        values = np.frombuffer(streams["raw"], raw_dtype)
    elif entry["codec"] == "symbols":
        values = decode_symbols(entry["index"], streams["symbols"]).astype(np.int64) + int(entry["offset"])
    else:
        raise DszError(f"initializer {entry['name']!r}: unknown codec {entry['codec']!r}")
    if values.size != numel:
        raise DszError(f"initializer {entry['name']!r}: {values.size} stored values for shape {entry['dims']}")
    return values


def _decode_initializer(entry: dict, streams: dict[str, bytes]) -> onnx.TensorProto:
    name, data_type, dims = entry["name"], int(entry["data_type"]), [int(d) for d in entry["dims"]]
    numel = int(np.prod(dims, dtype=np.int64))
    if data_type == onnx.TensorProto.FLOAT:
        array = decode_tensor(entry["float"], streams).numpy() if "float" in entry else np.frombuffer(streams["raw"], "<f4")
        if array.size != numel:
            raise DszError(f"initializer {name!r}: {array.size} stored values for shape {dims}")
        return numpy_helper.from_array(array.reshape(dims).astype(np.float32), name)
    if data_type in _INT4_TYPES:
        values = _integer_values(entry, streams, numel, "<i1")
        return numpy_helper.from_array(values.reshape(dims).astype(helper.tensor_dtype_to_np_dtype(data_type)), name)
    if data_type not in _INTEGER_TYPES:
        raise DszError(f"initializer {name!r}: unsupported data type {data_type}")
    raw_dtype = _INTEGER_TYPES[data_type]
    values = _integer_values(entry, streams, numel, raw_dtype)
    return numpy_helper.from_array(values.astype(np.dtype(raw_dtype).newbyteorder("=")).reshape(dims), name)


def unpack_onnx(path: str | Path) -> onnx.ModelProto:
    """The packed model, every initializer restored exactly; checked with ``onnx.checker``."""
    manifest, streams = read_archive(path)
    if manifest.get("format") != FORMAT:
        raise DszError(f"{path}: format {manifest.get('format')!r} is not an ONNX archive (expected {FORMAT})")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(zstandard.ZstdDecompressor().decompress(streams[manifest["graph"]]))
        restored = {}
        for entry in manifest["initializers"]:
            tensor_streams = {kind: streams[key] for kind, key in entry["streams"].items()}
            restored[entry["name"]] = _decode_initializer(entry, tensor_streams)
    except DszError as exc:
        raise DszError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, zstandard.ZstdError) as exc:
        raise DszError(f"{path}: corrupt ONNX archive ({type(exc).__name__}: {exc})") from None
    for tensor in model.graph.initializer:
        if tensor.name in restored:
            tensor.CopyFrom(restored[tensor.name])
    check_onnx(model, str(path), DszError)
    return model


@backend(Pack, "onnx")
def _pack_step(model: onnx.ModelProto, cfg: Pack, ctx: Context) -> tuple[onnx.ModelProto, dict]:
    """Pack into ``ctx.out_dir``, restore, and prove the restored model is the packed one, byte for byte."""
    expected = normalize_initializers(model)
    report = pack_onnx(expected, ctx.out_dir / "model.dsz")
    restored = unpack_onnx(report.path)
    if restored.SerializeToString() != expected.SerializeToString():
        raise OnnxModelError("pack/unpack round trip changed the ONNX model")  # a bug, never the user's input
    details = {
        "graph_stream_bytes": report.graph_bytes,
        "tensors": [t.__dict__ | {"bits_per_value": t.bits_per_weight} for t in report.tensors],
    }
    return restored, {"archive": report.path, "file_bytes": report.file_bytes, "details": details}

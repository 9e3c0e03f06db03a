"""Post-training quantization of an ONNX graph (the PTQ config of the PyTorch path).

* ``activation_bits: null`` -- weight-only: each Conv/Gemm/MatMul weight becomes
  int8 codes (int4 at <= 4 bits, opset 21) + per-channel scales, restored by a
  DequantizeLinear at load time; the graph computes in float.
* ``activation_bits: 8`` -- static QDQ: activation ranges are calibrated with
  deepshrink's observers on ONNX Runtime runs over an .npz of inputs; Q/DQ pairs
  (uint8 asymmetric) go where ORT fuses them into integer kernels
  (``placement.py``); weights are int8 symmetric per channel, biases int32 at
  scale x_scale * w_scale, as QLinearConv/QGemm expect. ``weight_bits: 7``
  keeps uint8 x int8 pair sums inside int16 on AVX2 CPUs without VNNI.

Bias correction (Nagel et al. 2019, as on the PyTorch path) shifts each layer's
bias by the difference of its float and quantized per-channel mean outputs on
the calibration data, layer after layer so each sees corrected inputs.
"""

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper, version_converter

from deepshrink.compress.quant.calibration import activation_spec, correct_biases, weight_qparams, weight_spec
from deepshrink.compress.quant.config import PTQ
from deepshrink.compress.quant.primitives import QuantSpec, quantize
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, backend
from deepshrink.export.names import NameGen
from deepshrink.onnx_in.calibrate import channel_means, observe
from deepshrink.onnx_in.data import NpzInputs
from deepshrink.onnx_in.model import consumers, graph_inputs, initializer_map, opset
from deepshrink.onnx_in.placement import Placement, plan_placement
from deepshrink.onnx_in.weights import WeightRef, weight_array, weight_refs

INT4_OPSET = 21  # DequantizeLinear on int4 codes
INT4_IR_VERSION = 10
PER_CHANNEL_OPSET = 13  # the axis attribute of Q/DQ
INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class WeightCodes:
    """A weight initializer's integer codes and scales, as the graph stores them."""

    codes: np.ndarray  # int8 values on the spec's grid
    scale: np.ndarray  # float32, (channels,) per channel or 0-d
    axis: int | None  # None: one scale for the tensor


def quantize_weight(weight: np.ndarray, spec: QuantSpec, observer: str = "minmax") -> WeightCodes:
    """Integer codes and scales of a weight (zero point 0: symmetric)."""
    w = torch.from_numpy(np.array(weight, dtype=np.float32))  # a writable copy
    scale, zero_point = weight_qparams(w, spec, observer)
    codes = quantize(w, scale, zero_point, spec).numpy().astype(np.int8)
    scale = scale.numpy().astype(np.float32)
    return WeightCodes(codes, scale.reshape(-1) if spec.per_channel else scale.reshape(()), spec.axis if spec.per_channel else None)


@dataclass(frozen=True)
class Layer:
    """A quantized node: its weight, output and the 1-d bias initializer it owns (if any)."""

    index: int
    name: str
    ref: WeightRef
    input: str
    output: str
    bias: str | None
    channels: int
    can_add_bias: bool  # Conv/Gemm with no bias input: correction may add one


@dataclass
class QuantState:
    layers: list[Layer]
    weights: dict[str, WeightCodes]  # by initializer name
    biases: dict[str, np.ndarray]  # by layer name: the float bias to write (original or corrected)
    activations: dict[str, tuple[float, int]] = field(default_factory=dict)  # Q/DQ points: (scale, zero point)
    int4: bool = False


# -- layers --------------------------------------------------------------------------
def _gemm_is_plain(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0


def _owned_bias(node: onnx.NodeProto, inits: dict, users: dict, channels: int) -> str | None:
    """The node's bias initializer when only this node reads it and it is 1-d float per channel."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return None
    name = node.input[2]
    tensor = inits.get(name)
    if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or list(tensor.dims) != [channels] or len(users[name]) != 1:
        return None
    return name if node.op_type == "Conv" or _gemm_is_plain(node) else None


def find_layers(model: onnx.ModelProto, refs: list[WeightRef]) -> list[Layer]:
    inits, users = initializer_map(model), consumers(model)
    by_weight = {ref.initializer: ref for ref in refs}
    layers = []
    for index, node in enumerate(model.graph.node):
        ref = by_weight.get(node.input[1]) if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else None
        if ref is None:
            continue
        channels = int(inits[ref.initializer].dims[ref.channel_axis])
        bias = _owned_bias(node, inits, users, channels)
        no_bias_input = len(node.input) < 3 or not node.input[2]
        can_add = no_bias_input and (node.op_type == "Conv" or (node.op_type == "Gemm" and _gemm_is_plain(node)))
        layers.append(Layer(index, node.name or f"{node.op_type}_{index}", ref, node.input[0], node.output[0], bias, channels, can_add))
    return layers


# -- writing the quantized graph ---------------------------------------------------------
class _Writer:
    """Builds the quantized copy of a float model from a QuantState."""

    def __init__(self, model: onnx.ModelProto, state: QuantState) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.state = state
        self.names = NameGen(self.model)
        self.new_inits: list[onnx.TensorProto] = []
        self.removed: set[str] = set()
        self.front: list[onnx.NodeProto] = []
        self.after: dict[int, list[onnx.NodeProto]] = {}
        self.renamed: dict[str, str] = {}

    def _init(self, base: str, array: np.ndarray, elem_type: int | None = None) -> str:
        name = self.names(base)
        if elem_type is not None:  # int4: two codes per byte in raw_data
            array = array.astype(helper.tensor_dtype_to_np_dtype(elem_type))
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def _dequantize(self, codes: str, scale: str, zero_point: str, output: str, axis: int | None) -> onnx.NodeProto:
        kwargs = {} if axis is None else {"axis": axis}
        return helper.make_node(
            "DequantizeLinear", [codes, scale, zero_point], [output], name=self.names(f"{output}_DequantizeLinear"), **kwargs
        )

    def weights(self) -> None:
        for name, qw in self.state.weights.items():
            elem = onnx.TensorProto.INT4 if self.state.int4 else None
            codes = self._init(f"{name}_quantized", qw.codes, elem)
            scale = self._init(f"{name}_scale", qw.scale)
            zero_point = self._init(f"{name}_zero_point", np.zeros(qw.scale.shape, np.int8), elem)
            self.front.append(self._dequantize(codes, scale, zero_point, name, qw.axis))
            self.removed.add(name)

    def biases(self) -> None:
        nodes = self.model.graph.node
        for layer in self.state.layers:
            bias = self.state.biases.get(layer.name)
            if bias is None:
                continue
            target = layer.bias or self.names(f"{layer.name}_bias")
            if layer.bias is None:
                _set_input(nodes[layer.index], 2, target)
            self.removed.add(target)
            if layer.input in self.state.activations:
                self._int32_bias(layer, bias, target)
            else:
                self.new_inits.append(numpy_helper.from_array(bias.astype(np.float32), target))

    def _int32_bias(self, layer: Layer, bias: np.ndarray, target: str) -> None:
        """int32 codes at scale x_scale * w_scale, zero point 0: what QLinearConv/QGemm take as bias."""
        qw = self.state.weights[layer.ref.initializer]
        scale = (np.float32(self.state.activations[layer.input][0]) * qw.scale).astype(np.float32)
        codes = np.clip(np.round(bias.astype(np.float64) / scale.astype(np.float64)), INT32.min, INT32.max).astype(np.int32)
        codes_name = self._init(f"{target}_quantized", codes)
        scale_name = self._init(f"{target}_scale", scale)
        zp_name = self._init(f"{target}_zero_point", np.zeros(scale.shape, np.int32))
        self.front.append(self._dequantize(codes_name, scale_name, zp_name, target, None if qw.axis is None else 0))

    def activations(self) -> None:
        inputs = {i.name for i in graph_inputs(self.model)}
        producer = {out: i for i, node in enumerate(self.model.graph.node) for out in node.output}
        for tensor, (scale, zero_point) in self.state.activations.items():
            scale_name = self._init(f"{tensor}_scale", np.array(scale, np.float32))
            zp_name = self._init(f"{tensor}_zero_point", np.array(zero_point, np.uint8))
            q_out = self.names(f"{tensor}_quantized")
            if tensor in inputs:
                dq_out = self.names(f"{tensor}_dequantized")
                for node in self.model.graph.node:
                    for k, name in enumerate(node.input):
                        if name == tensor:
                            node.input[k] = dq_out
                source, pair_out, slot = tensor, dq_out, None
            else:
                index = producer[tensor]
                node = self.model.graph.node[index]
                source = self.names(f"{tensor}_float")
                node.output[list(node.output).index(tensor)] = source
                self.renamed[tensor] = source
                pair_out, slot = tensor, index
            q = helper.make_node("QuantizeLinear", [source, scale_name, zp_name], [q_out], name=self.names(f"{tensor}_QuantizeLinear"))
            pair = [q, self._dequantize(q_out, scale_name, zp_name, pair_out, None)]
            if slot is None:
                self.front.extend(pair)
            else:
                self.after.setdefault(slot, []).extend(pair)

    def finish(self) -> tuple[onnx.ModelProto, dict[str, str]]:
        graph = self.model.graph
        ordered = list(self.front)
        for i, node in enumerate(graph.node):
            ordered.append(node)
            ordered.extend(self.after.get(i, []))
        del graph.node[:]
        graph.node.extend(ordered)
        kept = [t for t in graph.initializer if t.name not in self.removed]
        del graph.initializer[:]
        graph.initializer.extend(kept + self.new_inits)
        stale = [v for v in graph.input if v.name in self.removed]
        for value in stale:
            graph.input.remove(value)
        return self.model, self.renamed


def _set_input(node: onnx.NodeProto, slot: int, name: str) -> None:
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = name


def write_quantized(model: onnx.ModelProto, state: QuantState) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The quantized graph and the renames of tensors that now come out of a DequantizeLinear
    (their float producer writes ``renamed[name]``)."""
    writer = _Writer(model, state)
    writer.activations()  # first: it renames producer outputs by node index, before any insertion
    writer.weights()
    writer.biases()
    return writer.finish()


# -- bias correction -------------------------------------------------------------------------
def layer_depths(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, int]:
    """Per layer: the most quantized layers on any path from the inputs to it (itself included).
    Layers of one depth never feed each other, so they can be corrected together."""
    at = {layer.index: layer for layer in layers}
    tensor_depth: dict[str, int] = {}
    depths = {}
    for index, node in enumerate(model.graph.node):
        depth = max((tensor_depth.get(t, 0) for t in node.input if t), default=0)
        if index in at:
            depth += 1
            depths[at[index].name] = depth
        for out in node.output:
            tensor_depth[out] = depth
    return depths


def correct_layer_biases(float_model: onnx.ModelProto, state: QuantState, data: NpzInputs) -> float:
    """Empirical bias correction (``calibration.correct_biases``, the PyTorch path's loop), layers
    of one depth together so each depth sees its inputs already corrected; updates
    ``state.biases`` and returns the mean |shift|."""
    layers = [layer for layer in state.layers if layer.bias or layer.can_add_bias]
    if not layers:
        return 0.0
    depths = layer_depths(float_model, layers)
    reference = channel_means(float_model, data, {layer.output: 1 for layer in layers})
    groups = [[(layer.output, layer) for layer in layers if depths[layer.name] == depth] for depth in sorted(set(depths.values()))]

    def measure(group: list[tuple[str, Layer]]) -> dict[str, np.ndarray]:
        qmodel, renamed = write_quantized(float_model, state)
        means = channel_means(qmodel, data, {renamed.get(out, out): 1 for out, _ in group})
        return {out: means[renamed.get(out, out)] for out, _ in group}

    def shift_bias(layer: Layer, shift: np.ndarray) -> None:
        base = state.biases.get(layer.name)
        base = np.zeros(layer.channels, np.float32) if base is None else base
        state.biases[layer.name] = (base.astype(np.float64) + shift).astype(np.float32)

    shifts = correct_biases(groups, reference, measure, shift_bias)
    return float(np.mean([np.abs(shift).mean() for shift in shifts]))


# -- the step --------------------------------------------------------------------------------
def _prepared(model: onnx.ModelProto, int4: bool) -> onnx.ModelProto:
    """Shape-inferred copy at an opset that has what the quantized graph needs."""
    target = INT4_OPSET if int4 else PER_CHANNEL_OPSET
    if opset(model) < target:
        try:
            model = version_converter.convert_version(model, target)
        except Exception as exc:  # the converter has no adapter for some old ops
            raise InputError(f"quantize: cannot convert the model to opset {target} ({str(exc).splitlines()[0]})") from None
    out = onnx.shape_inference.infer_shapes(model)
    if int4:
        out.ir_version = max(out.ir_version, INT4_IR_VERSION)
    return out


def _initial_biases(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, np.ndarray]:
    inits = initializer_map(model)
    return {layer.name: numpy_helper.to_array(inits[layer.bias]).astype(np.float32) for layer in layers if layer.bias}


def quantize_onnx(model: onnx.ModelProto, cfg: PTQ, data: NpzInputs | None = None) -> tuple[onnx.ModelProto, dict]:
    """Quantize ``model`` as ``cfg`` says; ``data`` calibrates activations (static) and biases.
    Returns the quantized model and a summary."""
    static = cfg.activation_bits is not None
    if static and cfg.activation_bits != 8:
        raise InputError(
            f"quantize: ONNX Runtime's integer kernels take 8-bit activations; activation_bits {cfg.activation_bits} is not supported"
        )
    if static and data is None:
        raise InputError("quantize: static quantization (activation_bits set) calibrates on data: pass an .npz of inputs")
    int4 = not static and cfg.weight_bits <= 4
    model = _prepared(model, int4)
    refs = weight_refs(model, cfg.scope)
    if not refs:
        raise InputError(f"quantize: no Conv/Gemm/MatMul weight initializer matches the scope {cfg.scope}")
    calib = data.subset(cfg.calib_samples) if data is not None else None
    layers = find_layers(model, refs)
    placement = plan_placement(model, refs) if static else Placement()
    activations = {}
    if static:
        ranges = observe(model, calib, placement.observed, cfg.activation_observer, activation_spec(cfg.activation_bits))
        activations = {t: ranges[placement.source[t]] for t in placement.points}
    weights = {
        ref.initializer: quantize_weight(
            weight_array(model, ref), weight_spec(cfg.weight_bits, ref.channel_axis, cfg.per_channel), cfg.weight_observer
        )
        for ref in refs
    }
    state = QuantState(layers, weights, _initial_biases(model, layers), activations, int4)
    shift = correct_layer_biases(model, state, calib) if cfg.bias_correction and calib is not None else None
    qmodel, _ = write_quantized(model, state)
    summary = {
        "mode": "static" if static else "weight-only",
        "weight_bits": cfg.weight_bits,
        "activation_bits": cfg.activation_bits,
        "weight_storage": "int4" if int4 else "int8",
        "layers": len(layers),
        "qdq_pairs": len(activations),
        "integer_nodes": placement.nodes,
        "calibration_samples": len(calib) if calib is not None else 0,
        "bias_correction_mean_abs_shift": shift,
        "opset": opset(qmodel),
    }
    return qmodel, summary


@backend(PTQ, "onnx")
def _quantize_step(model: onnx.ModelProto, cfg: PTQ, ctx: Context) -> tuple[onnx.ModelProto, dict]:
    return quantize_onnx(model, cfg, ctx.calib)

"""Turn a float model into a fake-quant model with the quantizer placement ONNX
Runtime fuses into integer kernels.

Placement rule (the QDQ layout of ONNX Runtime's own quantizer): every input of
a quantized Conv/Linear and of a residual add is on the int8 grid, and so is
every Conv/Linear/add output (after its ReLU when a ReLU is the only user).
Ops that keep values on the grid (max pooling, flatten, ReLU, dropout) pass a
quantized tensor through; where such a tensor feeds a quantized op, the source's
quantizer is applied again (an identity in PyTorch) so the exported graph reads
DQ -> MaxPool/Flatten -> Q, which ONNX Runtime runs on the integers. Average
pooling of a quantized tensor gets its own output quantizer, so ONNX Runtime
fuses it into QLinearAveragePool / QLinearGlobalAveragePool.
"""

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from deepshrink.compress.quant.calibration import activation_spec, weight_spec
from deepshrink.compress.quant.modules import ActQuant, QuantConv2d, QuantLinear, WeightQuantizer, act_quantizers, fake_quant_layers
from deepshrink.compress.quant.primitives import QuantSpec
from deepshrink.compress.structure.fold import fold_batchnorm
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.modules import replace_module
from deepshrink.distributed import current_placement

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
RELU_MODULES = (nn.ReLU,)
RELU_FUNCTIONS = {F.relu, torch.relu}
GRID_KEEPING_MODULES = (nn.MaxPool2d, nn.Flatten, nn.ReLU, nn.Dropout)
GRID_KEEPING_FUNCTIONS = {torch.flatten, F.relu, torch.relu, F.max_pool2d}
ALL_LAYERS = Scope()
GRID_KEEPING_METHODS = {"view", "reshape", "flatten", "relu", "contiguous"}
AVERAGE_POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
AVERAGE_POOL_FUNCTIONS = {F.avg_pool2d, F.adaptive_avg_pool2d}


def prepare(
    model: nn.Module,
    weight_bits: int | dict[str, int],
    activation_bits: int | None,
    scope: Scope = ALL_LAYERS,
    quantizer: WeightQuantizer | dict[str, WeightQuantizer] = "fixed",
    activation_observer: str = "mse",
    fold_bn: bool = True,
    reduce_range: bool = False,
) -> fx.GraphModule:
    """A fake-quant copy of ``model``: weights of layers in ``scope`` quantized per
    channel (``weight_bits`` and ``quantizer`` may be per-layer mappings),
    activation quantizers in observe mode until calibrated. ``reduce_range``
    stores 8-bit weights on 7 bits (see ``PTQ``)."""
    model = fold_batchnorm(model) if fold_bn else model
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the user needs to know which model failed
        raise InputError(f"cannot trace the model for quantization ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    _drop_identities(graph_module)
    names = _swap_layers(graph_module, model, weight_bits, scope, quantizer, reduce_range)
    if not names:
        raise InputError(f"no Conv2d/Linear layer matches the quantization scope {scope}")
    if activation_bits is not None:
        _insert_act_quants(graph_module, set(names), activation_spec(activation_bits), activation_observer)
    graph_module.recompile()
    return graph_module.eval()


def _drop_identities(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()


def _per_layer(value, name: str, default):
    return value.get(name, default) if isinstance(value, dict) else value


def _swap_layers(gm: fx.GraphModule, original: nn.Module, weight_bits, scope: Scope, quantizer, reduce_range: bool) -> list[str]:
    swapped = []
    for name, layer in list(scope.layers(original)):
        if not _is_submodule(gm, name):
            continue
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        bits = _per_layer(weight_bits, name, 8)
        spec = weight_spec(min(bits, 7) if reduce_range else bits)
        new = cls.from_float(gm.get_submodule(name), spec, _per_layer(quantizer, name, "fixed"))
        replace_module(gm, name, new)
        swapped.append(name)
    return swapped


def _is_submodule(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


def _insert_act_quants(gm: fx.GraphModule, quantized: set[str], spec: QuantSpec, observer: str) -> None:
    placement = _tensors_to_quantize(gm, quantized)
    names: dict[fx.Node, str] = {}
    for index, node in enumerate(placement.own):
        names[node] = f"act_quant_{index}"
        gm.add_submodule(names[node], ActQuant(spec, observer))
        _insert_after(gm, node, names[node], {})
    for node, source in placement.requant.items():
        _insert_after(gm, node, names[source], {"requant": True})


def _insert_after(gm: fx.GraphModule, node: fx.Node, module_name: str, kwargs: dict) -> None:
    with gm.graph.inserting_after(node):
        quant = gm.graph.call_module(module_name, (node,), kwargs)
    node.replace_all_uses_with(quant, delete_user_cb=lambda user, q=quant: user is not q)


@dataclass
class Placement:
    """Nodes whose output gets a quantizer of its own, and grid-keeping nodes
    whose output is quantized again with the quantizer of the node they came from."""

    own: list[fx.Node] = field(default_factory=list)
    requant: dict[fx.Node, fx.Node] = field(default_factory=dict)


def _tensors_to_quantize(gm: fx.GraphModule, quantized: set[str]) -> Placement:
    placement = Placement()
    grid_source: dict[fx.Node, fx.Node] = {}  # tensor on the int8 grid -> node whose quantizer set that grid

    def mark(node: fx.Node) -> None:
        if node not in grid_source:
            placement.own.append(node)
            grid_source[node] = node

    def quantized_input(arg: fx.Node) -> None:
        if arg not in grid_source:
            mark(arg)
        elif grid_source[arg] is not arg:
            placement.requant[arg] = grid_source[arg]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            mark(node)
        elif _is_quantized_op(gm, node, quantized):
            for arg in _tensor_args(node):
                quantized_input(arg)
            out = _sole_relu_user(gm, node) or node
            if any(user.op != "output" for user in out.users):
                mark(out)
        elif node.args and node.args[0] in grid_source:
            if _keeps_grid(gm, node):
                grid_source[node] = grid_source[node.args[0]]
            elif _is_average_pool(gm, node):
                mark(node)
    return placement


def _tensor_args(node: fx.Node) -> Iterable[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _is_quantized_op(gm: fx.GraphModule, node: fx.Node, quantized: set[str]) -> bool:
    if node.op == "call_module":
        return node.target in quantized
    if node.op == "call_function":
        return node.target in ADD_FUNCTIONS and len(_tensor_args(node)) == 2
    return node.op == "call_method" and node.target in ("add", "add_") and len(_tensor_args(node)) == 2


def _sole_relu_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    (user,) = node.users
    is_relu = (user.op == "call_module" and isinstance(gm.get_submodule(user.target), RELU_MODULES)) or (
        user.op == "call_function" and user.target in RELU_FUNCTIONS
    )
    return user if is_relu else None


def _is_average_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), AVERAGE_POOL_MODULES)
    return node.op == "call_function" and node.target in AVERAGE_POOL_FUNCTIONS


def _keeps_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), GRID_KEEPING_MODULES)
    if node.op == "call_function":
        return node.target in GRID_KEEPING_FUNCTIONS
    return node.op == "call_method" and node.target in GRID_KEEPING_METHODS


# -- calibration ---------------------------------------------------------------


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], weight_observer: str = "minmax") -> int:
    """Observe activations on fp32 weights, then fix every quantizer's step. Returns samples seen."""
    model.eval()
    for _, layer in fake_quant_layers(model):
        layer.weight_quant.enabled = False
    seen = 0
    home = next(model.parameters()).device
    device = current_placement().device or home  # --device moves calibration too; a model on a GPU calibrates there
    model.to(device)
    try:
        for batch in batches:
            model(batch.to(device))
            seen += len(batch)
    finally:
        model.to(home)  # the caller gets its model back where it was; observers' statistics move with it
    for _, layer in fake_quant_layers(model):
        layer.weight_quant.calibrate(layer.weight, weight_observer)
        layer.weight_quant.enabled = True
    for quantizer in act_quantizers(model):
        quantizer.freeze()
    return seen

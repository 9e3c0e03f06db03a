"""Fidelity on every graph output, not only the first.

A model zoo's ONNX file often returns more than the tensor that matters: the input ids or
the attention mask passed through, a shape, a mask built from the inputs. Such outputs do
not depend on any weight, so they stay identical however broken the compressed model is,
and a report that measured one of them would claim perfect fidelity. Here every output is
classified from the graph (does a weight reach it?) and measured; the headline fidelity is
the worst over the outputs that depend on weights, or the output the user names.
"""

from dataclasses import dataclass

import numpy as np
import onnx

from deepshrink.core.errors import InputError
from deepshrink.evaluate.fidelity import Fidelity, fidelity

# Ops whose outputs depend on the shape of their input, never on its values.
SHAPE_ONLY_OPS = {"Shape", "Size"}
# Integer weights: the input slot that takes the codes of a quantized weight.
CODES_INPUT = {
    "DequantizeLinear": 0,
    "GatherBlockQuantized": 0,
    "MatMulNBits": 1,
    "MatMulInteger": 1,
    "DynamicQuantizeMatMul": 1,
    "ConvInteger": 1,
    "QLinearConv": 3,
    "QLinearMatMul": 3,
}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _is_weight(tensor: onnx.TensorProto) -> bool:
    """A learned parameter: a float constant with more than one value (scalars are
    epsilons, scales of a mask, -10000 fill values...; integer constants are indices and shapes)."""
    return tensor.data_type in FLOAT_TYPES and int(np.prod(tensor.dims, dtype=np.int64)) > 1


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    return next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def constant_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """Graph outputs that no weight reaches, each with why: ``input passed through``, ``shape``,
    or ``computed from the inputs only`` (a mask, positions). Nodes come in topological order
    (an ONNX requirement), so one pass decides every tensor."""
    graph = model.graph
    codes = {n.input[CODES_INPUT[n.op_type]] for n in graph.node if n.op_type in CODES_INPUT and len(n.input) > CODES_INPUT[n.op_type]}
    depends = {t.name: _is_weight(t) or t.name in codes for t in graph.initializer}
    kind = {i.name: "input passed through" for i in graph.input if i.name not in depends}
    for node in graph.node:
        if node.op_type == "Constant":
            value = _constant_value(node)
            weight, why = value is not None and _is_weight(value), "computed from the inputs only"
        elif node.op_type in SHAPE_ONLY_OPS:
            weight, why = False, "shape"
        else:
            weight = _has_subgraph(node) or any(depends.get(t, False) for t in node.input if t)  # a subgraph: assume it does
            sources = {kind.get(t) for t in node.input if t and t in kind}
            why = "input passed through" if node.op_type in ("Identity", "Cast") and sources == {"input passed through"} else None
            why = why or ("shape" if sources == {"shape"} else "computed from the inputs only")
        for out in node.output:
            depends[out] = weight
            kind[out] = why
    return {o.name: kind.get(o.name, "computed from the inputs only") for o in graph.output if not depends.get(o.name, False)}


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


@dataclass(frozen=True)
class OutputFidelity:
    """One graph output compared with the reference's."""

    name: str
    constant: str | None  # why it does not depend on the weights; None when it does
    identical: bool
    fidelity: Fidelity | None  # None for constant outputs (nothing to measure)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "constant": self.constant,
            "identical": self.identical,
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
        }


def is_logit_vector(output: np.ndarray, labels: np.ndarray | None) -> bool:
    """(samples, classes) scores with a class for every label: Top-1 and argmax agreement mean something."""
    return labels is not None and output.ndim == 2 and output.shape[1] > max(1, int(labels.max()))


def compare_outputs(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], constant: dict[str, str], labels: np.ndarray | None
) -> list[OutputFidelity]:
    """Every output of ``candidate`` against ``reference`` (by name, same outputs)."""
    if set(reference) != set(candidate):
        raise InputError(f"the outputs differ: reference {sorted(reference)}, candidate {sorted(candidate)}")
    rows = []
    for name, ref in reference.items():
        cand = candidate[name]
        identical = ref.shape == cand.shape and bool(np.array_equal(ref, cand))
        measured = None if name in constant else fidelity(ref, cand, agreement=is_logit_vector(ref, labels))
        rows.append(OutputFidelity(name, constant.get(name), identical, measured))
    return rows


def headline(rows: list[OutputFidelity], output: str | None = None) -> OutputFidelity:
    """The output a report leads with: the one the user named, else the worst (lowest mean
    cosine, then lowest min) of the outputs that depend on weights."""
    if output is not None:
        return next(r for r in rows if r.name == output)
    measured = [r for r in rows if r.fidelity is not None]
    if not measured:  # no output depends on a weight: nothing compression can change
        return rows[0]
    return min(measured, key=lambda r: (r.fidelity.cosine_mean, r.fidelity.cosine_min))


def check_output_name(model: onnx.ModelProto, output: str | None) -> None:
    """``output`` names a graph output that depends on the weights, or is None."""
    if output is None:
        return
    names, constant = output_names(model), constant_outputs(model)
    if output not in names:
        raise InputError(f"--output {output!r}: the model's outputs are {names}")
    if output in constant:
        real = [n for n in names if n not in constant]
        raise InputError(f"--output {output!r} does not depend on the weights ({constant[output]}); name one of {real}")

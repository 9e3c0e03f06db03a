"""Store fp32 embedding tables whose values are exact in fp16 at half the bytes.

A ``Gather`` on a constant fp32 table (axis 0) whose every value survives the
round trip through float16 becomes a ``Gather`` on the float16 table followed
by a ``Cast`` back to float: the same numbers, half the bytes. The torch side
decides which tables qualify by rounding them (``round_to_half``), so the
exported graph computes exactly what the torch model does.
"""

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deepshrink.export.names import NameGen


def round_to_half(embedding: nn.Embedding) -> nn.Embedding:
    """Round an embedding table (in place) to the nearest float16 values, kept as float32."""
    with torch.no_grad():
        embedding.weight.copy_(embedding.weight.half().float())
    return embedding


def _exact_in_half(array: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(array)) and np.array_equal(array.astype(np.float16).astype(np.float32), array))


def half_precision_tables(proto: onnx.ModelProto) -> list[str]:
    """Rewrite (in place) every fp32 Gather table exact in fp16; returns the tables rewritten."""
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    names, done, nodes = NameGen(proto), {}, []
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        table = node.input[0] if node.op_type == "Gather" and node.input else None
        init = inits.get(table) if table else None
        eligible = (
            init is not None
            and init.data_type == TensorProto.FLOAT
            and all(n.op_type == "Gather" and list(n.input).index(table) == 0 for n in uses[table])
            and table not in outputs
            and not any(a.name == "axis" and a.i != 0 for a in node.attribute)
        )
        if eligible and table not in done:
            array = numpy_helper.to_array(init)
            done[table] = _exact_in_half(array)
            if done[table]:
                init.CopyFrom(numpy_helper.from_array(array.astype(np.float16), table))
        if eligible and done[table]:
            half = names(f"{node.output[0]}_fp16")
            nodes.append(helper.make_node("Gather", [table, node.input[1]], [half], axis=0, name=names(f"{node.name or half}_GatherFp16")))
            nodes.append(helper.make_node("Cast", [half], [node.output[0]], to=TensorProto.FLOAT, name=names(f"{node.name or half}_Cast")))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return [t for t, ok in done.items() if ok]

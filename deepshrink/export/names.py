"""Fresh names for nodes and tensors added to an ONNX graph."""

import onnx


class NameGen:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.used = {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
        self.used |= {n for node in graph.node for n in (*node.input, *node.output, node.name)}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

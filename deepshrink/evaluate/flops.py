"""MACs and FLOPs per layer, dense and effective (zero weights skipped).

Counting runs one forward pass with hooks: leaf layers (conv, linear, BN,
activations, pooling) are counted from their shapes, and element-wise tensor
adds/muls written inside a module's own ``forward`` (residual connections) are
caught by a dispatch mode and charged to that module. Conventions follow
``torch.utils.flop_counter``: 1 MAC = 2 FLOPs, biases are not counted in conv
and linear FLOPs, so dense conv+linear FLOPs equal FlopCounterMode's total.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.PReLU)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
_ELEMENTWISE = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor}


@dataclass
class LayerCost:
    name: str
    kind: str
    macs: int = 0  # dense multiply-accumulates of conv/linear weights
    effective_macs: int = 0  # MACs whose weight is non-zero
    flops: int = 0  # all floating point operations, incl. BN, activations, pooling, adds
    params: int = 0
    output_shape: tuple[int, ...] = ()


@dataclass
class ComputeReport:
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def effective_macs(self) -> int:
        return sum(layer.effective_macs for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def conv_linear_flops(self) -> int:
        return 2 * sum(layer.macs for layer in self.layers if layer.kind in ("Conv2d", "Linear"))


def _weight_layer_cost(module: nn.Module, out: torch.Tensor) -> tuple[int, int]:
    """(dense MACs, effective MACs) per batch for conv/linear: every weight is used once per output position."""
    weight = module.weight
    # Conv: once per output pixel; Linear: once per row of the flattened leading dims.
    uses = out.shape[0] * out.shape[2] * out.shape[3] if isinstance(module, nn.Conv2d) else out.numel() // out.shape[-1]
    return uses * weight.numel(), uses * int(torch.count_nonzero(weight))


def _leaf_cost(module: nn.Module, inputs: tuple, out: torch.Tensor) -> tuple[int, int, int]:
    """(macs, effective macs, flops) of one leaf layer call."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        macs, eff = _weight_layer_cost(module, out)
        return macs, eff, 2 * macs
    if isinstance(module, NORMS):
        return 0, 0, 2 * out.numel()  # inference BN: one scale and one shift per element; not counted as MACs
    if isinstance(module, ACTIVATIONS):
        return 0, 0, out.numel()
    if isinstance(module, POOLS):
        window = inputs[0].numel() // max(out.numel(), 1)  # elements reduced into each output
        return 0, 0, out.numel() * window
    return 0, 0, 0


class _ElementwiseCounter(TorchDispatchMode):
    """Counts tensor-tensor adds/muls issued outside leaf layers (e.g. residual adds)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.leaf_depth = 0
        self.flops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.leaf_depth == 0 and func in _ELEMENTWISE and all(isinstance(a, torch.Tensor) for a in args[:2]):
            owner = self.stack[-1] if self.stack else ""
            self.flops[owner] = self.flops.get(owner, 0) + out.numel()
        return out


def _is_leaf_counted(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear, *NORMS, *ACTIVATIONS, *POOLS, nn.Flatten, nn.Dropout, nn.Identity))


@torch.no_grad()
def count_compute(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1) -> ComputeReport:
    """Per-layer MACs/FLOPs for one forward pass of ``batch_size`` inputs of ``input_shape``."""
    report = ComputeReport()
    counter = _ElementwiseCounter()
    handles = []
    for name, module in model.named_modules():
        leaf = _is_leaf_counted(module)

        def pre(mod, args, name=name, leaf=leaf):
            counter.stack.append(name)
            counter.leaf_depth += leaf

        def post(mod, args, out, name=name, leaf=leaf):
            counter.stack.pop()
            counter.leaf_depth -= leaf
            if leaf and isinstance(out, torch.Tensor):
                macs, eff, flops = _leaf_cost(mod, args, out)
                if macs or flops:
                    params = sum(p.numel() for p in mod.parameters(recurse=False))
                    report.layers.append(LayerCost(name, type(mod).__name__, macs, eff, flops, params, tuple(out.shape[1:])))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    was_training = model.training
    model.eval()
    try:
        with counter:
            model(torch.zeros(batch_size, *input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    for owner, flops in counter.flops.items():
        report.layers.append(LayerCost(owner or "<model>", "add", 0, 0, flops))
    return report


@torch.no_grad()
def flop_counter_flops(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1) -> int:
    """PyTorch's own count (conv, matmul and friends), the reference our dense conv+linear count must equal."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch_size, *input_shape))
    model.train(was_training)
    return counter.get_total_flops()

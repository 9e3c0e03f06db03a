"""Channel dependency analysis for structured pruning.

Removing output channel ``i`` of a conv is only valid if every layer that sees
that channel drops it too: the following BatchNorm, the next conv's or linear's
input (through flatten: ``H*W`` features per channel), the other operand of a
residual ``add``, a depthwise conv that passes it through. This module traces the
model with ``torch.fx``, propagates a per-tensor *channel layout* (which group
each channel belongs to) through the graph, and merges groups that an add
couples. The result is a list of :class:`ChannelGroup`: sets of (module, role)
that must be edited together.

The analysis is conservative: a channel that reaches an op it does not
understand (slicing, a reshape other than flatten, a grouped conv, the model
output, a module called twice) makes its whole group unprunable.
"""

import contextlib
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from deepshrink.core.errors import InputError

Kind = Literal["out", "in", "bn"]
# A tensor's channel layout: consecutive segments (group id, repeat); a segment spans
# group.size * repeat entries of dim 1, each group channel ``repeat`` consecutive ones.
Layout = tuple[tuple[int, int], ...]

PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
F = nn.functional
PASS_FUNCTIONS = {
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.elu,
    F.mish,
    F.sigmoid,
    F.tanh,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to"}
ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
}
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
SHAPE_METHODS = {"size", "dim"}  # read the shape only, never the channel values


@dataclass(frozen=True)
class Member:
    """One module's share of a group: group channel ``c`` is entries
    ``offset + c*repeat ... offset + (c+1)*repeat - 1`` of the module's dim for ``kind``
    (``out``: weight dim 0 of a conv/linear, incl. a depthwise conv's passed-through
    channels; ``in``: weight dim 1; ``bn``: a BatchNorm's features)."""

    module: str
    kind: Kind
    offset: int = 0
    repeat: int = 1

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """The module-dim indices of the given group channels."""
        channels = torch.as_tensor(channels, dtype=torch.long).view(-1, 1)
        return (self.offset + channels * self.repeat + torch.arange(self.repeat)).flatten()


@dataclass
class ChannelGroup:
    """Channels coupled across layers: channel ``i`` is pruned from all members or none."""

    size: int
    members: tuple[Member, ...]
    prunable: bool = True
    reasons: tuple[str, ...] = ()

    @property
    def producers(self) -> tuple[str, ...]:
        """Layers whose filters create (or, for depthwise convs, pass on) these channels."""
        return tuple(dict.fromkeys(m.module for m in self.members if m.kind == "out"))

    @property
    def key(self) -> frozenset[tuple[str, str]]:
        """Identifies the group across pruning rounds (offsets and sizes change, roles do not)."""
        return frozenset((m.module, m.kind) for m in self.members)

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"fixed ({'; '.join(self.reasons)})"
        return f"{self.size} channels of {', '.join(self.producers) or '<no producer>'}: {state}"


@dataclass
class _Groups:
    """Union-find over groups, collecting members and reasons to block them."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    members: dict[int, list[Member]] = field(default_factory=dict)
    reasons: dict[int, list[str]] = field(default_factory=dict)

    def new(self, size: int, reason: str | None = None) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.size.append(size)
        self.members[gid], self.reasons[gid] = [], []
        if reason:
            self.reasons[gid].append(reason)
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.members[a] += self.members.pop(b)
            self.reasons[a] += self.reasons.pop(b)

    def add(self, gid: int, member: Member) -> None:
        self.members[self.find(gid)].append(member)

    def block(self, layout: "Layout | None", reason: str) -> None:
        for gid, _ in layout or ():
            root = self.find(gid)
            if reason not in self.reasons[root]:
                self.reasons[root].append(reason)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode (BN statistics untouched, dropout off), then restore every module's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Trace ``model`` on ``example_input`` and return its channel groups, prunable ones first.

    Groups are in graph order within each class, so the list is stable across
    pruning rounds of the same architecture.
    """
    graph = _traced_graph(model, example_input)
    modules = dict(model.named_modules())
    state = _Groups()
    env: dict[fx.Node, Layout] = {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        _visit(node, modules, env, state, calls)
    _block_shared_modules(model, state, calls)
    order = {name: i for i, name in enumerate(modules)}
    groups = []
    for gid, members in state.members.items():
        if not members:
            continue  # channels no layer holds weights for (e.g. a tensor only returned)
        reasons = tuple(state.reasons[gid]) or (() if any(m.kind == "out" for m in members) else ("no producing layer",))
        members = sorted(members, key=lambda m: (order[m.module], m.kind, m.offset))
        groups.append(ChannelGroup(state.size[gid], tuple(members), not reasons, reasons))
    return sorted(groups, key=lambda g: not g.prunable)


def _traced_graph(model: nn.Module, example_input: torch.Tensor) -> fx.Graph:
    """Symbolic trace plus shape propagation (eval mode, so BN statistics are untouched)."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise InputError(
            f"structured pruning needs a torch.fx-traceable model; tracing {type(model).__name__} failed: {type(exc).__name__}: {exc}"
        ) from None
    try:
        with eval_mode(traced), torch.no_grad():
            ShapeProp(traced).propagate(example_input)
    except Exception as exc:
        raise InputError(f"example input of shape {tuple(example_input.shape)} does not run through the model: {exc}") from None
    return traced.graph


def _shape(node: Any) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _layout_size(layout: Layout, state: _Groups) -> list[tuple[int, int]]:
    """(entries, repeat) per segment: what two layouts must share to be merged."""
    return [(state.size[state.find(g)] * r, r) for g, r in layout]


def _visit(node: fx.Node, modules: dict[str, nn.Module], env: dict[fx.Node, Layout], state: _Groups, calls: dict[str, int]) -> None:
    if node.op == "output":
        for arg in _flat_nodes(node.args):
            state.block(env.get(arg), "model output")
        return
    if node.op in ("placeholder", "get_attr"):
        _fresh(node, env, state, "model input" if node.op == "placeholder" else "constant tensor")
        return
    if node.op == "call_module":
        calls[node.target] = calls.get(node.target, 0) + 1
        _visit_module(node, modules[node.target], env, state)
        return
    _visit_function(node, env, state)


def _flat_nodes(args: Any) -> Iterable[fx.Node]:
    if isinstance(args, fx.Node):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from _flat_nodes(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _flat_nodes(a)


def _fresh(node: fx.Node, env: dict[fx.Node, Layout], state: _Groups, reason: str | None) -> int | None:
    """A new group for the node's output channels (dim 1), if it is a tensor with channels."""
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        return None
    gid = state.new(shape[1], reason)
    env[node] = ((gid, 1),)
    return gid


def _opaque(node: fx.Node, env: dict[fx.Node, Layout], state: _Groups, why: str) -> None:
    """An op we do not understand: fix every channel it reads and every one it makes."""
    for arg in _flat_nodes((node.args, node.kwargs)):
        state.block(env.get(arg), why)
    _fresh(node, env, state, why)


def _input_node(node: fx.Node) -> fx.Node | None:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _visit_module(node: fx.Node, module: nn.Module, env: dict[fx.Node, Layout], state: _Groups) -> None:
    src = _input_node(node)
    layout = env.get(src)
    extra = [a for a in _flat_nodes((node.args[1:], node.kwargs)) if a in env]
    kind = type(module)
    if layout is None or extra:
        _opaque(node, env, state, f"{node.target} ({kind.__name__}) reads channels in a way not analysed")
    elif kind is nn.Conv2d:
        _conv(node, module, layout, env, state)
    elif kind is nn.Linear and len(_shape(src) or ()) == 2:
        for gid, offset, repeat in _segments(layout, state):
            state.add(gid, Member(node.target, "in", offset, repeat))
        gid = _fresh(node, env, state, None)
        state.add(gid, Member(node.target, "out"))
    elif kind in (nn.BatchNorm2d, nn.BatchNorm1d) and _same_channels(node, src):
        for gid, offset, repeat in _segments(layout, state):
            state.add(gid, Member(node.target, "bn", offset, repeat))
        env[node] = layout
    elif kind in PASS_MODULES and _same_channels(node, src):
        env[node] = layout
    elif kind is nn.Flatten and module.end_dim == -1:
        _flatten(node, src, layout, module.start_dim, env, state)
    else:
        _opaque(node, env, state, f"{node.target} ({kind.__name__}) is not supported by the channel analysis")


def _segments(layout: Layout, state: _Groups) -> Iterable[tuple[int, int, int]]:
    """(group, offset into dim 1, repeat) per segment."""
    offset = 0
    for gid, repeat in layout:
        yield gid, offset, repeat
        offset += state.size[state.find(gid)] * repeat


def _same_channels(node: fx.Node, src: fx.Node) -> bool:
    a, b = _shape(node), _shape(src)
    return a is not None and b is not None and len(a) == len(b) and len(a) >= 2 and a[:2] == b[:2]


def _conv(node: fx.Node, conv: nn.Conv2d, layout: Layout, env: dict[fx.Node, Layout], state: _Groups) -> None:
    """Dense conv: input channels -> 'in', new output group. Depthwise: passes its input group through."""
    if any(repeat != 1 for _, repeat in layout):
        _opaque(node, env, state, f"{node.target}: conv input is not a channel map")
        return
    if conv.groups == 1:
        for gid, offset, _ in _segments(layout, state):
            state.add(gid, Member(node.target, "in", offset))
        state.add(_fresh(node, env, state, None), Member(node.target, "out"))
    elif conv.groups == conv.in_channels == conv.out_channels:
        for gid, offset, _ in _segments(layout, state):
            state.add(gid, Member(node.target, "out", offset))
        env[node] = layout
    else:
        why = f"{node.target}: grouped conv (groups={conv.groups}) is not pruned"
        state.block(layout, why)
        _fresh(node, env, state, why)


def _flatten(node: fx.Node, src: fx.Node, layout: Layout, start_dim: int, env: dict[fx.Node, Layout], state: _Groups) -> None:
    """flatten(x, 1) of (N, C, *spatial): each channel becomes prod(spatial) consecutive features."""
    shape = _shape(src)
    if shape is None or start_dim != 1 or _shape(node) is None or len(_shape(node)) != 2:
        _opaque(node, env, state, f"{node.target}: flatten other than flatten(x, 1)")
        return
    spatial = 1
    for size in shape[2:]:
        spatial *= size
    env[node] = tuple((gid, repeat * spatial) for gid, repeat in layout)


def _visit_function(node: fx.Node, env: dict[fx.Node, Layout], state: _Groups) -> None:
    target = node.target
    method = node.op == "call_method"
    src = _input_node(node)
    if (method and target in SHAPE_METHODS) or (target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim")):
        return  # reads the shape, no channel values flow on
    if (method and target in ELEMENTWISE_METHODS) or (not method and target in ELEMENTWISE_FUNCTIONS):
        _elementwise(node, env, state)
    elif src in env and ((method and target in PASS_METHODS) or (not method and target in PASS_FUNCTIONS)):
        others = [a for a in _flat_nodes((node.args[1:], node.kwargs)) if a in env]
        if others or not _same_channels(node, src):
            _opaque(node, env, state, f"{node.name}: {_name(target)} mixes channels")
        else:
            env[node] = env[src]
    elif src in env and _is_flatten_call(node):
        _flatten(node, src, env[src], _flatten_start(node), env, state)
    elif not method and target in CAT_FUNCTIONS:
        _cat(node, env, state)
    else:
        _opaque(node, env, state, f"{node.name}: {_name(target)} is not supported by the channel analysis")


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_flatten_call(node: fx.Node) -> bool:
    """torch.flatten(x, 1) / x.flatten(1) / x.view(n, -1) / x.reshape(n, -1)."""
    target, args = node.target, node.args
    if target is torch.flatten or (node.op == "call_method" and target == "flatten"):
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        return end == -1
    if node.op == "call_method" and target in ("view", "reshape"):
        dims = args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        out, src = _shape(node), _shape(args[0])
        return len(dims) == 2 and dims[-1] == -1 and out is not None and src is not None and len(out) == 2 and out[0] == src[0]
    return False


def _flatten_start(node: fx.Node) -> int:
    if node.target in ("view", "reshape"):
        return 1
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)


def _elementwise(node: fx.Node, env: dict[fx.Node, Layout], state: _Groups) -> None:
    """add/sub/mul: a tensor with a scalar passes through; two tensors couple their channels."""
    tensors = [a for a in _flat_nodes((node.args, node.kwargs)) if a in env]
    out = _shape(node)
    if not tensors:
        _fresh(node, env, state, "computed from no analysed tensor")
        return
    if out is None or any(_shape(t) != out for t in tensors):
        _opaque(node, env, state, f"{node.name}: broadcasting {_name(node.target)}")
        return
    first = env[tensors[0]]
    if any(_layout_size(env[t], state) != _layout_size(first, state) for t in tensors[1:]):
        _opaque(node, env, state, f"{node.name}: {_name(node.target)} of differently laid out channels")
        return
    for t in tensors[1:]:
        for (a, _), (b, _) in zip(first, env[t], strict=True):
            state.union(a, b)
    env[node] = first


def _cat(node: fx.Node, env: dict[fx.Node, Layout], state: _Groups) -> None:
    """cat along dim 1 concatenates layouts; along dim 0 (batch) couples them like an add."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = _shape(node)
    if out is None or not isinstance(parts, (list, tuple)) or not all(p in env for p in parts) or not isinstance(dim, int):
        _opaque(node, env, state, f"{node.name}: cat of unanalysed tensors")
        return
    dim = dim % len(out)
    if dim == 1:
        env[node] = tuple(seg for p in parts for seg in env[p])
    elif dim == 0:
        _elementwise(node, env, state)
    else:
        _opaque(node, env, state, f"{node.name}: cat along dim {dim}")


def _block_shared_modules(model: nn.Module, state: _Groups, calls: dict[str, int]) -> None:
    """A layer called twice or reachable under two names cannot be rebuilt consistently by one setattr."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    aliased = {n for group in names.values() if len(group) > 1 for n in group}
    shared = {name for name, count in calls.items() if count > 1} | aliased
    for gid, members in state.members.items():
        for m in members:
            if m.module in shared:
                state.block(((gid, 1),), f"{m.module} is used more than once")
                break

"""Weight initializers of Conv/Gemm/MatMul nodes, and the methods that rewrite
them in place: magnitude pruning and k-means sharing.

A layer is named by its node (``/layer1/layer1.0/conv1/Conv``); a scope's
``include``/``exclude`` regexes match the node name or the initializer name, and
its ``types`` map ONNX ops onto the zoo's layer types: Conv -> ``Conv2d``,
Gemm/MatMul -> ``Linear``. The pruning and clustering rules are the PyTorch
path's own (``magnitude_masks``' exact per-layer counts and global threshold,
``kmeans_1d``), so one config means the same on both paths.
"""

import re
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from deepshrink.compress.prune.masks import exact_mask, kth_threshold
from deepshrink.compress.prune.unstructured import MagnitudePrune
from deepshrink.compress.share import KMeansShare, kmeans_1d
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, backend
from deepshrink.onnx_in.model import initializer_map, set_initializer

LAYER_TYPE = {"Conv": "Conv2d", "Gemm": "Linear", "MatMul": "Linear"}


@dataclass(frozen=True)
class WeightRef:
    """One layer's weight: the node, the initializer and the axis of its output channels."""

    node: str
    op: str
    initializer: str
    channel_axis: int

    @property
    def layer_type(self) -> str:
        return LAYER_TYPE[self.op]


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _weight_input(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[str, int] | None:
    """(initializer name, output-channel axis) of a node's weight, if it is a float initializer."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    tensor = inits[node.input[1]]
    if tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    rank = len(tensor.dims)
    if node.op_type == "Conv" and rank >= 3:
        return node.input[1], 0
    if node.op_type == "Gemm" and rank == 2:
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return node.input[1], 0 if trans_b else 1
    if node.op_type == "MatMul" and rank == 2 and node.input[0] not in inits:
        return node.input[1], 1
    return None


def weight_refs(model: onnx.ModelProto, scope: Scope | None = None) -> list[WeightRef]:
    """The layers in ``scope`` in graph order, one per weight initializer (a tied weight counts once)."""
    scope = scope or Scope()
    inits = initializer_map(model)
    refs, seen = [], set()
    for index, node in enumerate(model.graph.node):
        found = _weight_input(node, inits) if node.op_type in LAYER_TYPE and node.domain in ("", "ai.onnx") else None
        if found is None or found[0] in seen:
            continue
        ref = WeightRef(_node_name(node, index), node.op_type, *found)
        if _in_scope(ref, scope):
            refs.append(ref)
            seen.add(ref.initializer)
    return refs


def _in_scope(ref: WeightRef, scope: Scope) -> bool:
    if ref.layer_type not in scope.types:
        return False
    names = (ref.node, ref.initializer)
    if scope.include is not None and not any(re.search(scope.include, n) for n in names):
        return False
    return scope.exclude is None or not any(re.search(scope.exclude, n) for n in names)


def weight_array(model: onnx.ModelProto, ref: WeightRef) -> np.ndarray:
    return numpy_helper.to_array(initializer_map(model)[ref.initializer])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _require_refs(refs: list[WeightRef], scope: Scope, what: str) -> None:
    if not refs:
        raise InputError(f"{what}: no Conv/Gemm/MatMul weight initializer matches the scope {scope}")


def _finite(ref: WeightRef, weight: np.ndarray, what: str) -> None:
    if not np.isfinite(weight).all():
        raise InputError(f"{what}: layer {ref.node!r} has NaN or infinite weights")


# -- magnitude pruning ------------------------------------------------------------
def _layer_targets(refs: list[WeightRef], cfg: MagnitudePrune) -> dict[str, float]:
    """Per-layer sparsity: ``layer_sparsity`` keys may name the node or the initializer."""
    overrides = dict(cfg.layer_sparsity or {})
    known = {name for ref in refs for name in (ref.node, ref.initializer)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"prune: layer_sparsity names layers not in scope: {unknown}; in scope: {[r.node for r in refs]}")
    return {ref.node: overrides.get(ref.node, overrides.get(ref.initializer, cfg.sparsity)) for ref in refs}


def prune_initializers(model: onnx.ModelProto, cfg: MagnitudePrune) -> tuple[onnx.ModelProto, dict[str, float]]:
    """Zero the smallest-magnitude weights (layer-wise exact counts, or one global threshold).
    Returns the pruned copy and each layer's sparsity."""
    if cfg.schedule != "oneshot" or cfg.finetune is not None:
        raise InputError("prune: an ONNX model cannot be fine-tuned here; use schedule 'oneshot' without finetune")
    refs = weight_refs(model, cfg.scope)
    _require_refs(refs, cfg.scope, "prune")
    weights = {ref.node: weight_array(model, ref) for ref in refs}
    for ref in refs:
        _finite(ref, weights[ref.node], "prune")
    magnitudes = {name: torch.from_numpy(np.abs(w)) for name, w in weights.items()}
    if cfg.granularity == "global":
        threshold = kth_threshold(torch.cat([m.flatten() for m in magnitudes.values()]), cfg.sparsity)
        masks = {name: m > threshold for name, m in magnitudes.items()}
    else:
        targets = _layer_targets(refs, cfg)
        masks = {name: exact_mask(m, targets[name]) for name, m in magnitudes.items()}
    out, sparsity = _copy(model), {}
    for ref in refs:
        mask = masks[ref.node].numpy()
        set_initializer(out, ref.initializer, np.where(mask, weights[ref.node], np.float32(0.0)).astype(np.float32))  # +0.0
        sparsity[ref.node] = 1.0 - float(mask.mean())
    return out, sparsity


# -- k-means weight sharing ---------------------------------------------------------
def share_initializers(model: onnx.ModelProto, cfg: KMeansShare) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Replace each layer's non-zero weights by their k-means centroid (2^bits per layer; conv and
    fully-connected bits apart); zeros stay zero. Returns the copy and each layer's number of distinct values."""
    if cfg.finetune is not None:
        raise InputError("share: an ONNX model cannot be fine-tuned here; remove finetune")
    refs = weight_refs(model, cfg.scope)
    _require_refs(refs, cfg.scope, "share")
    out, sizes = _copy(model), {}
    for ref in refs:
        weight = weight_array(model, ref)
        _finite(ref, weight, "share")
        keep = weight != 0
        if not keep.any():
            continue
        bits = cfg.conv_bits if ref.op == "Conv" else cfg.linear_bits
        codebook, assignment = kmeans_1d(torch.from_numpy(weight[keep]), 2**bits, cfg.init, cfg.iters, cfg.seed)
        shared = np.zeros_like(weight)
        shared[keep] = codebook.numpy()[assignment.numpy()]
        set_initializer(out, ref.initializer, shared)
        sizes[ref.node] = int(assignment.unique().numel())  # values in use (an empty cluster keeps an unused centroid)
    return out, sizes


@backend(MagnitudePrune, "onnx")
def _prune_step(model: onnx.ModelProto, cfg: MagnitudePrune, ctx: Context) -> tuple[onnx.ModelProto, dict]:
    model, sparsity = prune_initializers(model, cfg)
    return model, {"layer_sparsity": sparsity}


@backend(KMeansShare, "onnx")
def _share_step(model: onnx.ModelProto, cfg: KMeansShare, ctx: Context) -> tuple[onnx.ModelProto, dict]:
    model, sizes = share_initializers(model, cfg)
    return model, {"codebook_sizes": sizes}

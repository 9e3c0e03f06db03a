"""Quantization-aware training: start from a calibrated fake-quant model, then
train through the quantizers with straight-through gradients (LSQ learns the
step sizes too), in the shared Trainer."""

import copy

from torch import nn

from deepshrink.compress.quant.config import QAT, resolve_reduce_range
from deepshrink.compress.quant.modules import act_quantizers
from deepshrink.compress.quant.prepare import calibrate, prepare
from deepshrink.compress.quant.ptq import calibration_batches
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.train import Trainer, TrainHook

MODULE_QUANTIZER = {"lsq": "lsq", "ste": "fixed", "binary": "binary", "ternary": "ternary"}
EDGE_BITS = 8  # first and last layers, when kept at higher precision


def layer_plan(model: nn.Module, cfg: QAT) -> tuple[dict[str, int], dict[str, str]]:
    """Weight bits and quantizer per layer in scope."""
    names = [name for name, _ in cfg.scope.layers(model)]
    if not names:
        raise InputError(f"no Conv2d/Linear layer matches the quantization scope {cfg.scope}")
    bits = {name: cfg.weight_bits for name in names}
    quantizer = {name: MODULE_QUANTIZER[cfg.weight_quantizer] for name in names}
    if cfg.keep_first_last:
        for edge in {names[0], names[-1]}:
            bits[edge] = EDGE_BITS
            quantizer[edge] = "fixed"  # 8-bit steps need no learning, and a learned step on 9-weight stem filters is unstable
    bits.update(cfg.layer_bits or {})
    return bits, quantizer


def prepare_qat(model: nn.Module, cfg: QAT, batches) -> nn.Module:
    bits, quantizer = layer_plan(model, cfg)
    qmodel = prepare(model, bits, cfg.activation_bits, cfg.scope, quantizer, reduce_range=resolve_reduce_range(cfg.reduce_range))
    # MSE-optimal clipping starts low-bit weights far closer to their trained optimum than min-max.
    calibrate(qmodel, batches, weight_observer="mse" if min(bits.values()) <= 4 else "minmax")
    for quant in act_quantizers(qmodel):
        quant.learn_scale(cfg.activation_steps == "lsq")
        quant.track_range(cfg.activation_steps == "ema")
    return qmodel


def qat(model: nn.Module, cfg: QAT, ctx: Context, hooks: list[TrainHook] | None = None) -> nn.Module:
    if ctx.data is None:
        raise InputError("quantization-aware training needs data: pass data= (a DataBundle)")
    qmodel = prepare_qat(model, cfg, calibration_batches(ctx, cfg.calib_samples, ctx.calib))
    Trainer(qmodel, cfg.finetune, ctx.data.train, ctx.data.val, hooks=hooks, progress=ctx.progress).fit()
    for quant in act_quantizers(qmodel):
        quant.learn_scale(False)
        quant.track_range(False)
    return qmodel.eval()


@method("qat", QAT, needs=("data", "calib?"), quantizes=True)
class QATMethod:
    def torch(self, model: nn.Module, cfg: QAT, ctx: Context) -> nn.Module:
        return qat(model, cfg, ctx)

    def restore(self, model: nn.Module, cfg: QAT, ctx: Context, saved: dict) -> nn.Module:
        return prepare_qat(copy.deepcopy(model), cfg, calibration_batches(ctx, cfg.calib_samples, ctx.calib))

"""Accuracy-aware automatic compression: per-layer sparsity and k-means bits under a budget.

The search follows Deep Compression (prune -> k-means share -> entropy-coded
``.dsz``) but picks every layer's sparsity and codebook bits itself:

1. *Sensitivity*: each layer alone is pruned to a few sparsities and, separately,
   k-means shared at each candidate bit width; the cost is the KL divergence of
   the model's outputs from the original's on a validation subset (smooth and
   strictly positive, where a Top-1 count on a few hundred images is mostly 0).
2. *Bytes*: the model is packed once per (sparsity, bits) pair with every layer
   alike; each layer's coded streams plus its manifest entry give a per-layer
   byte table, the rest (biases, BN, header) a fixed overhead.
3. *Plan path*: per layer, the lower convex hull of (bytes, cost) from the
   cheapest option toward fewer bytes; merging all layers' moves by cost per byte
   saved orders plans from least to most aggressive (a Lagrangian sweep).
4. *Accuracy-aware loop* (as Intel Neural Compressor's tuning loop): a trial
   prunes to the plan with gradual (AGP) fine-tuning, shares with codebook
   fine-tuning, packs the ``.dsz`` and measures bytes on disk and Top-1 on the
   gate set. One-layer costs ignore recovery by fine-tuning, which differs a lot
   between pruning (all weights retrain) and sharing (only codebooks do), so each
   trial rescales the two by the damage it measured and the path is rebuilt.
   With a size target the least aggressive plan estimated to fit is tried; too
   big corrects the estimate, too inaccurate retries the re-weighted plan (the
   same plan again means longer fine-tuning). Without one, a geometric bisection
   of the byte budget finds the smallest plan within ``max_drop``. A trial
   continues from the last good pruned model, so fine-tuning accumulates. Every
   fine-tune distills from the original model (Hinton's soft targets, teacher
   logits computed once per image), which recovers more than labels alone.

A latency target adds a first stage: structured channel pruning (the knob that
makes dense ONNX Runtime kernels faster) at the smallest ratio that meets it.

Impossible budgets fail before any training with an ``InputError`` that says
what is reachable; a reachable budget the accuracy bound rules out gives
``AutoResult.met = False`` with the closest trial written out.

The package: ``budget`` (flag parsing), ``options`` (knobs, trials, result),
``costs`` (sensitivity and byte tables), ``plan`` (the plan path), ``stages``
(prune, share, fine-tune), ``search`` (the trials), ``run`` (``auto_compress``)
and ``report`` (plan.json, report.json/md).
"""

from deepshrink.pipeline.auto.budget import check_max_drop, parse_latency, parse_size
from deepshrink.pipeline.auto.costs import interpolated_cost
from deepshrink.pipeline.auto.options import AutoOptions, AutoResult, Option, Trial
from deepshrink.pipeline.auto.plan import hull_path, plan_bytes, plan_path
from deepshrink.pipeline.auto.report import TRIAL_COLUMNS
from deepshrink.pipeline.auto.run import auto_compress
from deepshrink.pipeline.auto.stages import Teacher, prune_stage

__all__ = [
    "TRIAL_COLUMNS",
    "AutoOptions",
    "AutoResult",
    "Option",
    "Teacher",
    "Trial",
    "auto_compress",
    "check_max_drop",
    "hull_path",
    "interpolated_cost",
    "parse_latency",
    "parse_size",
    "plan_bytes",
    "plan_path",
    "prune_stage",
]

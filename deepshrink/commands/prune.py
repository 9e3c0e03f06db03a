"""``deepshrink prune``: magnitude, channel or N:M pruning, fine-tuning and ONNX export, compared before and after."""

import argparse
import json

from deepshrink.commands import command
from deepshrink.commands.args import add_data_args, load_data, print_comparison, report_header, run_folder, set_threads
from deepshrink.core.errors import DeepShrinkError
from deepshrink.core.files import write_atomic


def add_commands(sub) -> None:
    p = sub.add_parser("prune", help="prune (magnitude, channel or N:M), fine-tune, export; compare before and after")
    p.add_argument("model", help="zoo name or module:function")
    p.add_argument("--method", required=True, choices=["magnitude", "channel", "nm"])
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights (magnitude) or channels (channel) to remove")
    p.add_argument("--granularity", choices=["layer", "global"], default=None, help="magnitude/channel (default: layer)")
    p.add_argument(
        "--importance", choices=["l1", "l2", "bn_scale", "taylor", "hessian", "random"], default=None, help="channel only (default: l1)"
    )
    p.add_argument("--round-to", type=int, default=None, help="channel only: keep channel counts at multiples of K")
    p.add_argument("--nm", default=None, help="nm only: keep N of every M weights (default: 2:4)")
    p.add_argument("--exclude", default=None, help="regex of layer names to leave unpruned")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs after pruning (0: none)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning peak learning rate")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument("--out", default=None, help="output folder (default: runs/prune-<model>-<method>)")
    p.add_argument("--train-subset", type=int, default=None)
    add_data_args(p)
    p.add_argument("--sensitivity", action="store_true", help="also measure per-layer sensitivity on the validation set (before pruning)")
    p.add_argument("--sensitivity-subset", type=int, default=1000, help="validation images used by --sensitivity")
    p.add_argument("--repeats", type=int, default=20, help="ORT latency runs at batch 64")
    p.add_argument("--no-progress", action="store_true")


PRUNE_LATENCY_BATCH = 64


@command("prune")
def _prune(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from deepshrink.compress.prune import nm_masks
    from deepshrink.core.methods import Context, apply_method
    from deepshrink.evaluate.compare import compare, measure, measure_ort_latency
    from deepshrink.export import onnx_bytes, ort_session
    from deepshrink.models import resolve_model

    cfg = _prune_config(args)  # before any loading: a bad flag fails at once
    set_threads(args)
    model = resolve_model(args.model, args.weights)
    if args.method == "nm":
        nm_masks(model, cfg.n, cfg.m, cfg.scope)  # a layer M does not divide fails before data loading and fine-tuning
    data = load_data(args, train_subset=args.train_subset)
    out = Path(run_folder(args, "prune", args.model, args.method))
    out.mkdir(parents=True, exist_ok=True)
    files = _prune_sensitivity(model, data, cfg, args, out) if args.sensitivity else {}
    onnx_before = onnx_bytes(model, data.input_shape)
    before = measure(model, data.test, onnx_before)
    start = time.perf_counter()
    pruned = apply_method(model, cfg, Context(data, progress=not args.no_progress))
    prune_time = time.perf_counter() - start
    after = measure(pruned, data.test, onnx_bytes(pruned, data.input_shape))
    files.update(_prune_write(pruned, cfg, data, out, args))
    session_after, diff = _prune_verify_onnx(pruned, data, files["onnx"], args.threads)
    sessions = {"before": ort_session(onnx_before, args.threads), "after": session_after}
    latency = measure_ort_latency(sessions, data.input_shape, (PRUNE_LATENCY_BATCH,), args.repeats, p90=True)
    comparison = compare({**before, **latency["before"]}, {**after, **latency["after"]})
    report = {
        **report_header(cfg, data, model=args.model, method=args.method),
        **comparison.to_dict(),
        "latency": {
            "backend": "onnxruntime",
            "batch_size": PRUNE_LATENCY_BATCH,
            "repeats": args.repeats,
            "rounds": 3,
            "threads": args.threads,
        },
        "onnx_max_abs_diff": diff,
        "prune_time_s": prune_time,
        "files": files,
    }
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    title = f"prune {report['model']} ({report['method']}) on {report['dataset']} test ({report['test_images']:,} images)"
    print_comparison(comparison, title)
    print(f"ONNX Runtime vs torch on the pruned model: max|diff| {diff:.2e}")
    print(f"wrote {', '.join(str(p) for p in files.values())} and {out / 'report.json'}")
    return 0


def _prune_config(args: argparse.Namespace):
    """The method config for the flags; flags that the method ignores are errors, not silently dropped."""
    import re

    from deepshrink.compress.prune import ChannelPrune, MagnitudePrune, NMPrune
    from deepshrink.core.config import Scope
    from deepshrink.train import TrainConfig

    unused = {
        "magnitude": {"--importance": args.importance, "--round-to": args.round_to, "--nm": args.nm},
        "channel": {"--nm": args.nm},
        "nm": {
            "--sparsity": args.sparsity,
            "--granularity": args.granularity,
            "--importance": args.importance,
            "--round-to": args.round_to,
        },
    }[args.method]
    given = [flag for flag, value in unused.items() if value is not None]
    if given:
        raise DeepShrinkError(f"--method {args.method} does not use {', '.join(given)}")
    if args.method != "nm" and args.sparsity is None:
        raise DeepShrinkError(f"--method {args.method} needs --sparsity")
    if args.finetune_epochs < 0:
        raise DeepShrinkError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    finetune = TrainConfig(epochs=args.finetune_epochs, lr=args.lr, threads=args.threads) if args.finetune_epochs else None
    scope = Scope(exclude=args.exclude)
    granularity = args.granularity or "layer"
    if args.method == "magnitude":
        return MagnitudePrune(sparsity=args.sparsity, granularity=granularity, scope=scope, finetune=finetune)
    if args.method == "channel":
        return ChannelPrune(
            ratio=args.sparsity,
            importance=args.importance or "l1",
            granularity=granularity,
            round_to=args.round_to or 1,
            scope=scope,
            finetune=finetune,
        )
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", args.nm or "2:4")
    if not match:
        raise DeepShrinkError(f"--nm must look like N:M (e.g. 2:4), got {args.nm!r}")
    return NMPrune(n=int(match[1]), m=int(match[2]), scope=scope, finetune=finetune)


def _prune_write(model, cfg, data, out, args: argparse.Namespace) -> dict[str, str]:
    from deepshrink.export import export_onnx
    from deepshrink.models import architecture_of, save_weights

    metadata = {"architecture": json.dumps(architecture_of(args.model)), "method": args.method, "config": json.dumps(cfg.to_dict())}
    weights = save_weights(model, out / "model.safetensors", metadata)
    onnx = export_onnx(model, out / "model.onnx", data.input_shape)
    return {"weights": str(weights), "onnx": str(onnx)}


def _prune_verify_onnx(model, data, path: str, threads: int | None):
    """The written ONNX file's session and its max|diff| from torch on a test batch."""
    from deepshrink.export import ort_session, verify_onnx

    session = ort_session(path, threads)
    return session, verify_onnx(model, session, data.test.images[:PRUNE_LATENCY_BATCH])


def _prune_sensitivity(model, data, cfg, args: argparse.Namespace, out) -> dict[str, str]:
    """Per-layer magnitude sensitivity of the unpruned model: JSON (with suggested ratios for magnitude) and PNG."""
    from deepshrink.analysis.sensitivity import layer_sensitivity, layer_sparsities_for_target, plot_sensitivity

    if len(data.val) == 0:
        raise DeepShrinkError("--sensitivity measures on the validation set: use --val-size > 0")
    val = data.val.subset(args.sensitivity_subset)
    result = layer_sensitivity(model, val, scope=cfg.scope)
    payload = result.to_dict()
    if args.method == "magnitude":
        try:
            payload["suggested_layer_sparsity"] = layer_sparsities_for_target(result, cfg.sparsity)
        except DeepShrinkError as exc:  # e.g. a target above the measured levels: the analysis still stands
            payload["suggested_layer_sparsity"] = None
            payload["suggestion_error"] = str(exc)
    write_atomic(out / "sensitivity.json", (json.dumps(payload, indent=2) + "\n").encode())
    png = plot_sensitivity(result, out / "sensitivity.png", title=f"{args.model}: per-layer sensitivity ({len(val):,} validation images)")
    return {"sensitivity_json": str(out / "sensitivity.json"), "sensitivity_png": str(png)}

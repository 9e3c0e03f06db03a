"""``deepshrink compress``: run a recipe on a PyTorch model (run folder, .dsz, ONNX, per-stage report) or an ONNX file."""

import argparse
import json
from pathlib import Path

from deepshrink.commands import command
from deepshrink.commands.args import add_data_args, load_data, run_folder, set_threads
from deepshrink.commands.compress_transformer import DEFAULT_SAMPLES, check_steps, compress_transformer, is_model_dir
from deepshrink.core.errors import DeepShrinkError, InputError


def add_commands(sub) -> None:
    p = sub.add_parser("compress", help="run a compression recipe; writes .dsz, ONNX and a per-stage report")
    p.add_argument(
        "model",
        help="zoo name, module:function, an .onnx file (compressed without PyTorch source), "
        "or a Hugging Face encoder directory (config.json, weights, tokenizer)",
    )
    p.add_argument("--npz", default=None, help="ONNX input: calibration/evaluation inputs (one array per graph input, optional labels y)")
    p.add_argument("--eval-npz", default=None, help="ONNX input: a separate .npz to evaluate on (default: --npz)")
    p.add_argument(
        "--output", default=None, help="ONNX input: the graph output whose fidelity the report leads with (default: the worst one)"
    )
    p.add_argument("--texts", default=None, help="model directory: UTF-8 file, one text per line (default: Python reference sentences)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="model directory: default sentences to measure on")
    p.add_argument("--max-length", type=int, default=64, help="model directory: tokens per sequence at most")
    p.add_argument("--batch-size", type=int, default=16, help="model directory: sentences per batch")
    p.add_argument("--repeats", type=int, default=20, help="model directory: ORT latency runs")
    p.add_argument("--recipe", required=True, help="shipped recipe name (deep-compression) or a YAML file")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe>-<model>); re-running resumes")
    add_data_args(p)
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N training images only")
    p.add_argument(
        "--dry-run", action="store_true", help="validate the recipe and the model, print the plan and stop (nothing trained or written)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--deterministic", action="store_true", help="error on any op without a deterministic kernel; exact (slower) cuDNN/cuBLAS paths"
    )


@command("compress")
def _compress(args: argparse.Namespace) -> int:
    from deepshrink.core.determinism import deterministic
    from deepshrink.models import architecture_of, list_models, resolve_model
    from deepshrink.pipeline.recipe import load_recipe
    from deepshrink.pipeline.runner import STAGE_COLUMNS, run_recipe
    from deepshrink.report import print_table

    recipe = load_recipe(args.recipe)
    if is_model_dir(args.model):
        return _compress_model_dir(args, recipe)
    if args.texts:
        raise DeepShrinkError("--texts is for Hugging Face model directories (with a config.json)")
    onnx_in = args.model.endswith(".onnx")
    if onnx_in and not Path(args.model).is_file():
        raise InputError(f"{args.model}: no such ONNX file")
    if not onnx_in and (args.npz or args.eval_npz or args.output):
        raise DeepShrinkError("--npz, --eval-npz and --output are for .onnx models; PyTorch models use --dataset/--data-dir")
    model = None if onnx_in else resolve_model(args.model, args.weights)  # an unknown model or bad weights fail here
    print(f"recipe {recipe.name} on {args.model}:")
    print("\n".join(recipe.plan()))
    if args.dry_run:  # the recipe validated, the model resolved: nothing trained, nothing written
        return 0
    if onnx_in:
        return _compress_onnx(args, recipe)
    set_threads(args)
    data = load_data(args, train_subset=args.train_subset)
    out = run_folder(args, recipe.name, args.model)
    model_name = args.model if args.model in list_models() else None
    with deterministic(strict=args.deterministic):
        result = run_recipe(model, recipe, data, out, architecture_of(args.model), progress=not args.no_progress, model_name=model_name)
    print_table(result.rows, STAGE_COLUMNS, title=f"{recipe.name} on {args.model} ({len(data.test):,} test images)")
    for path in (result.dsz_path, result.onnx_path):
        if path:
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if result.onnx_max_abs_diff is not None:
        print(f"ONNX Runtime vs torch on the decoded model: max|diff| {result.onnx_max_abs_diff:.2e}")
    print(f"report: {result.out_dir / 'report.md'}")
    return 0


def _compress_model_dir(args: argparse.Namespace, recipe) -> int:
    check_steps(recipe)
    print(f"recipe {recipe.name} on {args.model}:")
    print("\n".join(recipe.plan()))
    if args.dry_run:
        return 0
    return compress_transformer(args, recipe)


def _compress_onnx(args: argparse.Namespace, recipe) -> int:
    from deepshrink.onnx_in import compress_onnx

    out = args.out or f"runs/{recipe.name}-{Path(args.model).stem}"
    report = compress_onnx(
        args.model,
        recipe,
        out,
        npz=args.npz,
        progress=not args.no_progress,
        eval_npz=args.eval_npz,
        threads=args.threads,
        output=args.output,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    print(f"report: {Path(out) / 'report.md'}")
    return 0

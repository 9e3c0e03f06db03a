"""``deepshrink study``: the models x methods grid, measured side by side, with an HTML report."""

import argparse

from deepshrink.commands import command


def add_commands(sub) -> None:
    from deepshrink.pipeline.study import BUDGETS, STUDY_METHODS

    p = sub.add_parser("study", help="compare compression methods on several models; writes study.md/json and report.html")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="quick", help="quick: minutes (2 models, 1-5 epochs); full: hours")
    p.add_argument("--models", default=None, help="comma-separated zoo models (default: the budget's)")
    p.add_argument("--methods", default=None, help=f"comma-separated methods or recipe names/paths (default: {', '.join(STUDY_METHODS)})")
    p.add_argument("--out", default=None, help="study folder (default: runs/study-<budget>); re-running resumes")
    p.add_argument("--threads", type=int, default=2, help="threads per cell")
    p.add_argument("--workers", type=int, default=None, help="cells in parallel (default: cores / threads)")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist", "cifar10", "npz"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--executor",
        choices=["process", "ray"],
        default="process",
        help="process: a local pool; ray: Ray tasks (pip install 'deepshrink[distributed]')",
    )
    p.add_argument(
        "--address", default=None, help="with --executor ray: the cluster (HOST:PORT, ray://HOST:PORT or auto); default: a local Ray"
    )


@command("study")
def _study(args: argparse.Namespace) -> int:
    from deepshrink.pipeline.study import BUDGETS, STUDY_COLUMNS, finished, resolve_methods, run_study
    from deepshrink.report import print_table

    budget = BUDGETS[args.budget]
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    result = run_study(
        args.out or f"runs/study-{budget.name}",
        models,
        resolve_methods(args.methods),
        budget,
        threads=args.threads,
        workers=args.workers,
        dataset=args.dataset,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        executor=args.executor,
        address=args.address,
        device=args.device,
    )
    print_table(result.rows, STUDY_COLUMNS, title=f"study ({budget.name}), {result.wall_s / 60:.1f} min")
    failed = [r for r in result.rows if not finished(r)]
    for row in failed:
        print(f"{row['model']} / {row['method']}: {row['status']}")
    print(f"wrote {result.out_dir / 'study.md'}, {result.out_dir / 'study.json'} and {result.out_dir / 'report.html'}")
    return 1 if failed else 0

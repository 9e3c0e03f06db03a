"""plan.json, report.json and report.md of an automatic compression run."""

import json
from pathlib import Path

from deepshrink.evaluate.compare import Comparison, compare
from deepshrink.evaluate.environment import environment
from deepshrink.export.onnx import write_atomic
from deepshrink.pipeline.auto.options import FP32_BITS, AutoResult
from deepshrink.report.tables import Column, markdown_table


def write_json(path: Path, payload) -> None:
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TRIAL_COLUMNS = [
    Column("trial", lambda t: t.number),
    Column("kind", lambda t: t.kind),
    Column("from", lambda t: t.start),
    Column("budget", lambda t: t.budget, "{:,}"),
    Column("sparsity %", lambda t: None if t.sparsity is None else 100 * t.sparsity, "{:.1f}"),
    Column("bits/non-zero", lambda t: t.mean_bits, "{:.2f}"),
    Column("est. bytes", lambda t: t.est_bytes, "{:,}"),
    Column(".dsz bytes", lambda t: t.bytes, "{:,}"),
    Column("Top-1 pruned", lambda t: t.gate_top1_pruned, "{:.2f}"),
    Column("Top-1", lambda t: t.gate_top1, "{:.2f}"),
    Column("drop", lambda t: t.drop, "{:.2f}"),
    Column("ok", lambda t: "yes" if t.feasible else "no"),
    Column("s", lambda t: t.seconds, "{:.0f}"),
    Column("note", lambda t: t.note),
]


def write_reports(result: AutoResult, out_dir: Path, sensitivity: dict | None) -> None:
    payload = {
        **result.to_dict(),
        "comparison": comparison(result).to_dict(),
        "sensitivity": sensitivity_json(sensitivity),
        "environment": environment(),
    }
    result.paths.update(report_json=out_dir / "report.json", report_md=out_dir / "report.md")
    payload["paths"] = {k: str(v) for k, v in result.paths.items()}
    write_json(result.paths["report_json"], payload)
    write_atomic(result.paths["report_md"], markdown_report(result).encode())


def sensitivity_json(sensitivity: dict | None) -> dict | None:
    if sensitivity is None:
        return None
    return {n: {kind: {str(k): v for k, v in costs.items()} for kind, costs in layer.items()} for n, layer in sensitivity.items()}


def comparison(r: AutoResult) -> Comparison:
    """The original (fp32 parameters) against the model decoded from model.dsz: test Top-1 and bytes on disk."""
    return compare({"top1": r.baseline_top1, "bytes": r.fp32_bytes}, {"top1": r.top1, "bytes": r.bytes}, ("original fp32", ".dsz"))


def markdown_report(r: AutoResult) -> str:
    budget = [f"max Top-1 drop {r.max_drop:g} points ({r.gate} set)"]
    if r.target_bytes is not None:
        budget.append(f".dsz at most {r.target_bytes:,} bytes")
    if r.target_latency_ms is not None:
        budget.append(f"ONNX Runtime latency at most {r.target_latency_ms:g} ms")
    lines = ["# Automatic compression", "", f"Budget: {', '.join(budget)}. Result: **{r.reason}**.", "", comparison(r).markdown().rstrip()]
    lines.append(f"| Top-1 % ({r.gate}, the gate) | {r.baseline_gate_top1:.2f} | {_fmt(r.gate_top1, '.2f')} | |")
    if r.target_latency_ms is not None:
        lines.append(f"| ORT latency ms | {_fmt(r.baseline_latency_ms, '.3f')} | {_fmt(r.latency_ms, '.3f')} | |")
    lines += ["", f"Compression ratio {_fmt(r.ratio, '.1f')}x (fp32 parameters against the .dsz file)."]
    lines += ["", f"Top-1 drop on test: {_fmt(r.drop, '.2f')} points. Search time {r.seconds:.0f} s.", "", "## Trials", ""]
    lines.append(markdown_table(r.trials, TRIAL_COLUMNS))
    lines += ["## Chosen plan", "", "| layer | sparsity % | bits |", "|---|---|---|"]
    lines += [f"| {n} | {100 * v['sparsity']:.1f} | {v['bits'] if v['bits'] != FP32_BITS else 'fp32'} |" for n, v in r.plan.items()]
    return "\n".join(lines) + "\n"

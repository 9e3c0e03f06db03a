"""Report figures as PNG bytes: Pareto fronts of a study, per-layer plans, recipe stages.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot: no
display is needed, and no global figure state leaks between calls (studies may render
reports from worker threads).
"""

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import cycle

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

_DPI = 100
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")
_FRONT_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class ParetoAxis:
    """One study plot: which row key goes on x, how it is labelled, and its scale."""

    key: str
    label: str
    log: bool = False
    scale: float = 1.0  # divides the raw value, e.g. bytes -> KiB
    mark_key: str | None = None  # a second x for the same point (effective MACs)


# Size and MACs span orders of magnitude between models (LeNet-300 vs ResNet-20), so log x.
PARETO_AXES: dict[str, ParetoAxis] = {
    "size": ParetoAxis("bytes", "size on disk (KiB, log)", log=True, scale=1024),
    "latency": ParetoAxis("ort_b64_ms", "ONNX Runtime latency, batch 64 (ms)"),
    "macs": ParetoAxis("macs", "MACs per image (millions, log; hollow: effective)", log=True, scale=1e6, mark_key="effective_macs"),
}


def figure_png(figure: Figure) -> bytes:
    """Encode a figure as PNG; metadata is dropped so the same data gives the same bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _number(value: object) -> float | None:
    # bool is an int subclass but never a measurement.
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def plottable(rows: Iterable[Mapping], key: str) -> list[Mapping]:
    """Rows that finished ("ok") and have both Top-1 and ``key`` measured."""
    return [r for r in rows if r.get("status") == "ok" and _number(r.get("top1")) is not None and _number(r.get(key)) is not None]


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats: each has strictly higher y than every point with smaller-or-equal x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _styles(names: Iterable[str], values: Sequence) -> dict[str, object]:
    # Sorted so a method keeps its colour (a model its marker) whatever the row order.
    return dict(zip(sorted(set(names)), cycle(values), strict=False))


def pareto_png(rows: Sequence[Mapping], axis: ParetoAxis, title: str = "") -> bytes | None:
    """Top-1 against ``axis.key``: colour per method, marker per model, front per model. None if nothing to plot."""
    rows = plottable(rows, axis.key)
    if not rows:
        return None
    colours = _styles((r["method"] for r in rows), [f"C{i}" for i in range(10)])
    markers = _styles((r["model"] for r in rows), _MARKERS)
    fronts = _styles((r["model"] for r in rows), _FRONT_STYLES)
    figure = _new_figure(8, 5)
    axes = figure.add_subplot()
    for row in rows:
        _plot_point(axes, row, axis, colours[row["method"]], markers[row["model"]])
    for model, style in fronts.items():
        points = [(r[axis.key] / axis.scale, r["top1"]) for r in rows if r["model"] == model]
        _plot_front(axes, pareto_front(points), style)
    axes.set(xlabel=axis.label, ylabel="Top-1 %", title=title)
    if axis.log:
        axes.set_xscale("log")
    axes.grid(alpha=0.3, which="both")
    axes.legend(handles=_legend(colours, markers, fronts), fontsize="small", loc="best")
    return figure_png(figure)


def _plot_point(axes, row: Mapping, axis: ParetoAxis, colour: str, marker: str) -> None:
    x, y = row[axis.key] / axis.scale, row["top1"]
    axes.scatter([x], [y], color=colour, marker=marker, s=45, zorder=3)
    mark = _number(row.get(axis.mark_key)) if axis.mark_key else None
    if mark is not None and mark / axis.scale != x:
        # Effective MACs (zeros skipped) only pay off on a sparse kernel; show both, linked.
        axes.scatter([mark / axis.scale], [y], facecolors="none", edgecolors=colour, marker=marker, s=45, zorder=3)
        axes.plot([x, mark / axis.scale], [y, y], color=colour, linewidth=0.8, linestyle=":", zorder=2)


def _plot_front(axes, front: list[tuple[float, float]], style: str) -> None:
    if len(front) < 2:
        return
    xs, ys = zip(*front, strict=True)
    # "post": the best accuracy reached at x holds for every larger x.
    axes.step(xs, ys, where="post", color="0.35", linewidth=1, linestyle=style, zorder=1)


def _legend(colours: Mapping, markers: Mapping, fronts: Mapping) -> list[Line2D]:
    # Proxy handles: one entry per method and per model, not one per (method, model) pair.
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in colours.items()]
    handles += [Line2D([], [], color="0.2", marker=k, linestyle="", label=m) for m, k in markers.items()]
    if len(fronts) > 1:
        handles += [Line2D([], [], color="0.35", linestyle=s, label=f"front: {m}") for m, s in fronts.items()]
    else:
        handles += [Line2D([], [], color="0.35", label="Pareto front")]
    return handles


def study_pngs(rows: Sequence[Mapping]) -> dict[str, bytes | None]:
    """The three study plots, keyed like ``PARETO_AXES``; a value is None when no row has that measurement."""
    titles = {"size": "Top-1 vs size", "latency": "Top-1 vs latency (ORT, batch 64)", "macs": "Top-1 vs MACs"}
    return {name: pareto_png(rows, axis, titles[name]) for name, axis in PARETO_AXES.items()}


def layer_plan_png(plan: Mapping[str, Mapping], title: str = "") -> bytes | None:
    """Horizontal bars of sparsity and bit width per layer (names stay readable); None if the plan is empty."""
    panels = [
        (key, label, limit)
        for key, label, limit in (("sparsity", "sparsity (%)", 100), ("bits", "bit width", None))
        if any(_number(v.get(key)) is not None for v in plan.values())
    ]
    if not panels:
        return None
    layers = list(plan)
    figure = _new_figure(4 + 3 * len(panels), 1.2 + 0.28 * len(layers))
    axes_list = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    scale = {"sparsity": 100, "bits": 1}
    for axes, (key, label, limit) in zip(axes_list, panels, strict=True):
        values = [(_number(plan[n].get(key)) or 0) * scale[key] for n in layers]
        axes.barh(range(len(layers)), values, color="C0" if key == "sparsity" else "C1")
        axes.set(xlabel=label, xlim=(0, limit) if limit else None)
        axes.grid(alpha=0.3, axis="x")
    axes_list[0].set_yticks(range(len(layers)), layers, fontsize="small")
    axes_list[0].invert_yaxis()  # first layer on top, as in the model
    if title:
        figure.suptitle(title)
    return figure_png(figure)


def stage_png(stage_rows: Sequence[Mapping], title: str = "") -> bytes | None:
    """Bytes (bars) and Top-1 (line) after each recipe stage, side by side; None if no stage has either."""
    stages = [str(r.get("stage", "?")) for r in stage_rows]
    drawers = {"bytes": _stage_bytes, "top1": _stage_top1}
    keys = [k for k in drawers if any(_number(r.get(k)) is not None for r in stage_rows)]
    if not keys:
        return None
    figure = _new_figure(5 * len(keys), 4 + 0.05 * max(len(s) for s in stages))
    for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys, strict=True):
        # A stage that skipped a measurement is a gap, not a zero.
        drawers[key](axes, [_number(r.get(key)) for r in stage_rows])
        axes.set_xticks(range(len(stages)), stages, rotation=30, ha="right", fontsize="small")
        axes.grid(alpha=0.3, axis="y")
    if title:
        figure.suptitle(title)
    return figure_png(figure)


def _stage_bytes(axes, values: list[float | None]) -> None:
    axes.bar(range(len(values)), [0 if v is None else v / 1024 for v in values], color="C0")
    axes.set(ylabel="size (KiB)")


def _stage_top1(axes, values: list[float | None]) -> None:
    # A line on an autoscaled axis: a 0.5-point drop would vanish on bars that start at 0.
    axes.plot(range(len(values)), [float("nan") if v is None else v for v in values], color="C2", marker="o")
    axes.set(ylabel="Top-1 %", xlim=(-0.5, len(values) - 0.5))

"""The HTML report: self-contained, escaped, every plot a real PNG, and it renders in a real browser."""

import base64
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib.image import imread

from deepshrink.core import files as core_files
from deepshrink.report import pareto_front, pareto_png, study_pngs, write_html_report
from deepshrink.report.plots import PARETO_AXES, plottable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _row(model, method, top1, size, latency, macs, effective=None, status="ok"):
    return {
        "model": model,
        "method": method,
        "status": status,
        "top1": top1,
        "top5": min(top1 + 8, 100) if top1 is not None else None,
        "params": 266_610,
        "nonzero_params": 26_661,
        "bytes": size,
        "compression_ratio": 1_066_440 / size if size else None,
        "macs": macs,
        "effective_macs": effective,
        "ort_b1_ms": 0.05,
        "ort_b64_ms": latency,
        "ort_session_mb": 1.1,
        "ort_b64_peak_mb": 8.5,
        "steps_peak_mb": 412.0,
        "seconds": 12.5,
    }


STUDY = [
    _row("lenet300", "baseline", 89.5, 1_066_440, 1.2, 266_200),
    _row("lenet300", "prune", 89.1, 140_000, 1.1, 266_200, effective=26_620),
    _row("lenet300", "int8", 89.3, 270_000, 0.6, 266_200),
    _row("lenet300", EVIL, 70.0, 50_000, 0.5, 266_200),
    _row("resnet20", "baseline", 91.8, 1_100_000, 9.5, 40_800_000),
    _row("resnet20", "prune", 91.0, 200_000, 9.4, 40_800_000, effective=4_100_000),
    _row("resnet20", "int8", 91.5, 290_000, 4.2, 40_800_000),
    _row("resnet20", "lowrank", None, None, None, None, status="RuntimeError: rank 0 for layer conv1"),
]
STAGES = [
    {
        "stage": "dense",
        "top1": 89.5,
        "top5": 99.0,
        "params": 266_610,
        "nonzero_params": 266_610,
        "bytes": 1_066_440,
        "ratio": 1.0,
        "seconds": 0.0,
    },
    {
        "stage": "prune",
        "top1": 89.0,
        "top5": 98.9,
        "params": 266_610,
        "nonzero_params": 26_661,
        "bytes": 140_000,
        "ratio": 7.6,
        "seconds": 30.2,
    },
    {
        "stage": "quantize",
        "top1": None,
        "top5": None,
        "params": 266_610,
        "nonzero_params": 26_661,
        "bytes": 40_000,
        "ratio": 26.7,
        "seconds": None,
    },
]
PLANS = {
    "lenet300 / auto": {"fc1": {"sparsity": 0.92, "bits": 4}, "fc2": {"sparsity": 0.85, "bits": 6}, "fc3": {"sparsity": 0.3, "bits": 8}},
    "resnet20 / bits only": {f"layer{i}.conv": {"bits": 4 + i % 5} for i in range(19)},
}
ENVIRONMENT = {"torch": "2.13.0", "cpu": "x86_64 avx512_vnni", "threads": 2, "flags": ["avx2", "fma"], "gpu": None}
NOTES = "# Findings\n\nPruning **halves** `bytes` & keeps accuracy <within 0.5>.\n\n- one\n- two <b>"

# 3 study plots + 1 stage plot + one per layer plan
EXPECTED_PLOTS = 3 + 1 + len(PLANS)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    # Module scope: rendering the plots takes a few seconds; tests only read the file.
    return write_html_report(
        tmp_path_factory.mktemp("out") / "report.html",
        f"Study {EVIL}",
        study_rows=STUDY,
        stage_rows=STAGES,
        layer_plans=PLANS,
        notes_markdown=NOTES,
        environment=ENVIRONMENT,
    )


class _Tables(HTMLParser):
    """Collects every table as a list of rows of cell texts (th and td alike)."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables(text: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(text)
    return parser.tables


# ---------------------------------------------------------------- unit: the file itself


@pytest.mark.unit
def test_report_is_self_contained(report: Path):
    text = report.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()  # the product needs no JavaScript
    assert "<link" not in text.lower() and "url(" not in text  # no external stylesheet, font or image
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


@pytest.mark.unit
def test_strings_are_escaped(report: Path):
    text = report.read_text(encoding="utf-8")
    escaped = html.escape(EVIL)
    assert f"<title>Study {escaped}</title>" in text
    assert text.count(escaped) >= 2  # title and the study table's method cell
    assert "&lt;within 0.5&gt;" in text and "&lt;b&gt;" in text  # notes are escaped, then marked up
    assert "<strong>halves</strong>" in text and "<code>bytes</code>" in text and "<li>one</li>" in text


@pytest.mark.unit
def test_every_plot_is_a_decodable_png(report: Path, tmp_path: Path):
    encoded = DATA_URI.findall(report.read_text(encoding="utf-8"))
    assert len(encoded) == EXPECTED_PLOTS
    for i, data in enumerate(encoded):
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 1024
        image = imread(_write(tmp_path / f"plot{i}.png", png))
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.01


@pytest.mark.unit
def test_tables_and_missing_values(report: Path):
    study, stages, environment = _tables(report.read_text(encoding="utf-8"))
    header = study[0]
    for name in ("model", "method", "Top-1 %", "Top-5 %", "params", "non-zero params", "bytes", "compression ratio"):
        assert name in header
    assert {"MMACs dense", "MMACs effective", "ORT b1 ms", "ORT b64 ms", "ORT MB", "ORT b64 peak MB", "steps peak MB", "time s"} <= set(
        header
    )
    assert len(study) == 1 + len(STUDY)
    failed = dict(zip(header, study[-1], strict=True))
    assert failed["Top-1 %"] == "-" and failed["bytes"] == "-" and failed["MMACs dense"] == "-"
    assert failed["status"].startswith("RuntimeError")
    pruned = dict(zip(header, study[2], strict=True))
    assert pruned["MMACs dense"] == "0.27" and pruned["MMACs effective"] == "0.03" and pruned["params"] == "266,610"
    assert dict(zip(header, study[1], strict=True))["MMACs effective"] == "-"
    assert stages[-1][1] == "-" and stages[-1][-1] == "-" and stages[-1][0] == "quantize"
    assert ["gpu", "-"] in environment and ["flags", '["avx2", "fma"]'] in environment


@pytest.mark.unit
def test_failed_rows_are_marked_and_not_plotted(report: Path):
    assert report.read_text(encoding="utf-8").count('<tr class="failed">') == 1
    crashed_late = {**STUDY[0], "status": "export failed"}  # numbers present, but the cell did not finish
    assert plottable([STUDY[0], crashed_late, STUDY[-1]], "bytes") == [STUDY[0]]
    assert pareto_png([crashed_late], PARETO_AXES["size"]) is None


@pytest.mark.unit
def test_plots_are_deterministic():
    assert study_pngs(STUDY) == study_pngs([dict(r) for r in STUDY])  # same rows, same bytes


@pytest.mark.unit
def test_missing_measurement_leaves_a_note_not_a_broken_image(tmp_path: Path):
    rows = [{**r, "ort_b64_ms": None} for r in STUDY]
    text = write_html_report(tmp_path / "r.html", "no latency", study_rows=rows).read_text(encoding="utf-8")
    assert len(DATA_URI.findall(text)) == 2
    assert "latency at batch 64: no rows with this measurement" in text


@pytest.mark.unit
def test_atomic_write_leaves_no_temp_file(report: Path):
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.html"]


@pytest.mark.unit
def test_failed_write_keeps_the_old_report_and_no_temp_file(tmp_path: Path, monkeypatch):
    path = _write(tmp_path / "report.html", b"old report")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(core_files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_html_report(path, "new", notes_markdown="no plots: keeps this test fast")
    assert path.read_bytes() == b"old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.unit
def test_pareto_front_keeps_only_undominated_points():
    points = [(10, 80), (5, 70), (5, 75), (20, 79), (30, 90), (1, 50)]
    assert pareto_front(points) == [(1, 50), (5, 75), (10, 80), (30, 90)]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- real browser

# Chromium logs every page console message (log, error, uncaught exception alike) at INFO as
# "[pid:tid:time:INFO:CONSOLE:line] "message", source: ..." (older builds: "CONSOLE(line)").
CONSOLE_LINE = re.compile(r"^\[[^\]]*:CONSOLE\b[^\]]*\].*$", re.M)
PROBE = """<script>
// Test-only: after every image has loaded or failed, record what the browser made of the page.
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images: [...document.images].map((i) => ({complete: i.complete, width: i.naturalWidth, alt: i.alt})),
    rows: [...document.querySelectorAll("table")].map((t) => t.rows.length),
  });
  document.body.appendChild(out);
});
</script>"""


def _find_chromium() -> str:
    """The browser's path; a skip on a developer's machine without it, a failure in CI (setup.sh installs it)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        message = "chromium not installed (Debian package chromium; scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the real-browser test")
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def chromium() -> str:
    return _find_chromium()


@pytest.mark.unit
def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run"):
        _find_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _find_chromium()


def _run_chromium(binary: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page; root needs --no-sandbox, a fresh profile keeps runs independent."""
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _console_messages(stderr: str) -> list[str]:
    return CONSOLE_LINE.findall(stderr)


def _probe(binary: str, page: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """Load a copy of ``page`` with the probe script appended; return its findings and the console lines."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    result = _run_chromium(binary, probed, tmp_path / "profile-probe", "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"probe did not run; DOM tail: {result.stdout[-500:]}"
    return json.loads(html.unescape(found.group(1))), _console_messages(result.stderr)


@pytest.mark.flow
def test_report_renders_in_chromium(chromium: str, report: Path, tmp_path: Path):
    # The product as shipped: screenshot it and catch anything it writes to the console.
    shot = tmp_path / "screenshot.png"
    shown = _run_chromium(chromium, report, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,4000")
    assert _console_messages(shown.stderr) == []
    image = imread(shot)
    assert image.shape[:2] == (4000, 1280)
    assert image[..., :3].std() > 0.05  # not a blank page
    assert (image[..., :3].min(axis=-1) < 0.5).mean() > 0.005  # some dark ink: text, axes, bars

    # What the browser built: every table parsed, every image decoded to a real width.
    probe, console = _probe(chromium, report, tmp_path)
    assert console == []
    # study, stages, environment; each with its header row but the environment's
    assert probe["rows"] == [1 + len(STUDY), 1 + len(STAGES), len(ENVIRONMENT)]
    assert len(probe["images"]) == EXPECTED_PLOTS
    broken = [i["alt"] for i in probe["images"] if not i["complete"] or i["width"] == 0]
    assert broken == []
    assert all(i["width"] >= 400 for i in probe["images"])


@pytest.mark.flow
def test_browser_checks_can_fail(chromium: str, tmp_path: Path):
    """The checks above would catch a console error, an uncaught exception and a broken image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><table><tr><td>x</td></tr></table>"
        '<img alt="corrupt" src="data:image/png;base64,AAAA"><img alt="absent" src="missing.png">'
        '<script>console.error("deliberate failure"); throw new Error("deliberate uncaught");</script>'
        "</body></html>",
        encoding="utf-8",
    )
    probe, console = _probe(chromium, bad, tmp_path)
    assert any("deliberate failure" in line for line in console)
    assert any("Uncaught Error: deliberate uncaught" in line for line in console)
    assert [i["width"] for i in probe["images"]] == [0, 0]
    assert probe["rows"] == [1]

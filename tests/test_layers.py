"""Layers point down only: every ``deepshrink`` import in every module (module-level and
inside functions alike) must name a layer at or below the importer's own.

The order, bottom to top (mechanism below, policy above):

    core < data < models < export < evaluate < distributed < train < compress < encode
         < analysis < report < transformers < onnx_in < pipeline < (cli, commands, the package root)

* ``export`` is torch -> ONNX and ONNX Runtime sessions, used by the metrics;
  the writers of quantized graphs are quantization's and live in ``compress.quant``.
* ``distributed`` (process groups, rank-0 writes) serves the training loop.
* ``evaluate`` holds pure metrics (accuracy, size, FLOPs, latency, fidelity),
  used by ``train`` and ``compress``; ``analysis`` (sensitivity scans) runs the methods.
* The top rank (the CLI entry point, its command modules and the curated package API)
  may import anything, each other included.

Static, so a forbidden import in a branch that no test executes still fails here.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deepshrink"
ORDER = [
    "core",
    "data",
    "models",
    "export",
    "evaluate",
    "distributed",
    "train",
    "compress",
    "encode",
    "analysis",
    "report",
    "transformers",
    "onnx_in",
    "pipeline",
]
TOP = {"cli", "commands", "__init__", "__main__"}  # the entry point, its commands and the curated API


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(layer: str) -> int:
    if layer in TOP:
        return len(ORDER)
    if layer not in ORDER:
        raise AssertionError(f"deepshrink.{layer} has no place in the layer order of tests/test_layers.py; add it")
    return ORDER.index(layer)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether ``name`` is the dotted name of a module in the package (strings naming one are lazy imports)."""
    if not name.startswith("deepshrink."):
        return False
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def deepshrink_imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every absolute or relative import of the package in ``path``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            else:
                found.append((node.module or "", node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and is_module(node.value):
            found.append((node.value, node.lineno))  # import_module("deepshrink.x") and lazy tables
    return [(name, line) for name, line in found if name == "deepshrink" or name.startswith("deepshrink.")]


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = layer_of(module_name(path))
        for target, line in deepshrink_imports(path):
            if target == "deepshrink":
                target = "deepshrink.__init__"
            if rank(layer_of(target)) > rank(source):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({source}) imports {target}")
    return problems


def test_every_layer_imports_only_downward():
    problems = upward_imports()
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_every_package_folder_has_a_place_in_the_order():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    for layer in folders | modules:
        rank(layer)  # raises for a layer nobody placed


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a function-level import of pipeline from core is reported."""
    fake = tmp_path / "deepshrink"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from deepshrink.pipeline import runner\n    return runner\n")
    (fake / "core" / "good.py").write_text("from deepshrink.core import errors\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert upward_imports() == ["deepshrink/core/bad.py:2 (core) imports deepshrink.pipeline"]

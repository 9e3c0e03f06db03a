"""The machine and software a measurement was taken on, stamped into every result."""

import os
import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import torch

from deepshrink.core.hardware import cpu_info


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    cpu, flags = cpu_info()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("deepshrink", "torch", "onnx", "onnxruntime", "numpy", "safetensors")},
    }


def describe_environment(env: dict, threads: int | None, shared: bool = False, extra_versions: dict[str, str] | None = None) -> str:
    """The two lines every results file opens with: the machine (and whether other jobs
    shared it), the threads, the date, and the package versions."""
    flags = f" ({', '.join(env['cpu_flags'])})" if env.get("cpu_flags") else ""
    sharing = ", shared with other jobs" if shared else ""
    versions = {**env["versions"], **(extra_versions or {})}
    return (
        f"Machine: {env['cpu']}{flags}, {env['cores']} cores{sharing}; threads: {threads}; date: {env['date']}.\n"
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.\n"
    )

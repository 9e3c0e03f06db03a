"""The machine and software a measurement was taken on, stamped into every result."""

import os
import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import torch

_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = [flag for flag in _FLAGS_OF_INTEREST if flag in value.split()]
                    break
    except OSError:
        pass
    return model, flags


def cpu_has_vnni() -> bool:
    """Whether the CPU has 8-bit dot-product instructions (VNNI). Without them ONNX
    Runtime's uint8 x int8 kernels add pairs of products in 16 bits, which overflow
    for 8-bit weights; 7-bit weights never do."""
    return any(flag in _cpu_info()[1] for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    cpu, flags = _cpu_info()
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

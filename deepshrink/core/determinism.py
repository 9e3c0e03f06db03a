"""Same inputs and seed, same bytes: the torch switches a run sets, and what its numbers depend on.

On CPU every op deepshrink's methods use is deterministic for a fixed thread count, so a run is
exact by default; ``deterministic()`` additionally asks torch for its deterministic variants of
the few kernels that have a faster racy one (index accumulation, and most of them on CUDA).
``strict=True`` (``deepshrink compress --deterministic``) makes an op with no deterministic
variant an error instead of a warning and takes cuDNN/cuBLAS's exact, slower paths.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS is deterministic only with a fixed workspace (CUDA docs)


def strict_enabled() -> bool:
    return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


@contextmanager
def deterministic(strict: bool = False) -> Iterator[None]:
    """Run the block with torch's deterministic algorithms; the previous settings come back after.
    A nested default block never weakens a strict caller."""
    strict = strict or strict_enabled()
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    # Filling every torch.empty with NaN only finds bugs (reads of uninitialised memory): strict pays for it.
    torch.utils.deterministic.fill_uninitialized_memory = strict
    if strict:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3], saved[4]


def determinism_record(seed: int) -> dict:
    """What identical bytes depend on, for report.json: two runs with equal values here (and the same
    inputs) write the same files; a different torch build, thread count or CPU code path may not."""
    return {
        "seed": seed,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD kernels ATen dispatched to
        "deterministic_algorithms": "strict" if strict_enabled() else "warn" if torch.are_deterministic_algorithms_enabled() else "off",
    }

"""The study grid on Ray: every cell is a Ray task that declares its CPUs (the cell's
threads) and GPUs (one when the study runs on ``--device cuda``), so Ray's scheduler,
not ours, packs cells onto a laptop or a cluster.

With no address a local Ray starts inside the command (and stops with it); with
``--address`` the study joins a running cluster (``HOST:PORT`` of its head node,
``ray://HOST:PORT`` for Ray Client, or ``auto`` for the cluster this machine is a
node of). Ray is an optional extra: ``pip install 'deepshrink[distributed]'``.
"""

import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from deepshrink.core.errors import InputError

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # cells return small dicts; Ray's default would reserve 30% of RAM
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(
            "--executor ray needs Ray: pip install 'deepshrink[distributed]' (or use the default --executor process)"
        ) from None
    return ray


def check_address(address: str) -> None:
    """An address that no Ray head answers on fails in seconds with one line, not after Ray's retries."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"no Ray cluster answers at {address} ({reason}); start one with `ray start --head` or fix --address") from None


def check_device(device: str | None) -> None:
    if device is not None and device.startswith("cuda:"):
        raise InputError(f"--device {device}: on Ray use --device cuda; Ray gives each cell its own GPU")


class RayCells:
    """A connection to Ray (a local one started here when no address is given) that runs cells."""

    def __init__(self, address: str | None, num_cpus: int | None = None) -> None:
        self.ray = import_ray()
        self.started_here = address is None
        if address is not None:
            check_address(address)
        try:
            if self.started_here:
                cpus = max(num_cpus or 0, os.cpu_count() or 1)
                self.ray.init(num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False)
            else:
                self.ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # ConnectionError, RuntimeError, ...: one line naming the address
            raise InputError(
                f"could not start or join Ray ({address or 'local'}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None

    def run(
        self, cells: list, run_cell: Callable[[Any], dict], failed_row: Callable[[Any, str], dict], gpus: Callable[[Any], int]
    ) -> Iterator[dict]:
        """Yield each cell's row as it finishes. A fresh worker process per cell (``max_calls=1``), so
        its peak memory is its own; a task that dies (worker crash, lost node) is recorded as that cell's error."""
        task = self.ray.remote(max_calls=1)(run_cell)
        refs = {task.options(num_cpus=cell.threads, num_gpus=gpus(cell)).remote(cell): cell for cell in cells}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            try:
                yield self.ray.get(done[0])
            except Exception as exc:
                yield failed_row(
                    refs[done[0]], f"ray: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                )

    def close(self) -> None:
        """Stop the local Ray started here; leave a cluster (it keeps running)."""
        self.ray.shutdown()

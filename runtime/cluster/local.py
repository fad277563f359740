"""The embedded cluster: a coordinator in the calling process and N worker processes it starts.

Imports: runtime.cluster.coordinator, runtime.errors.

Behind ``StreamEnvironment(workers=N)`` and ``shmflow run``. Once every worker
has attached, the region's name is unlinked early, so even a SIGKILL of every
process leaves nothing in /dev/shm.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

from runtime.cluster.coordinator import Coordinator

#: The directory that holds the imported ``runtime`` package (and ``operators``).
_RUNTIME_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if TYPE_CHECKING:
    from runtime.config import ShmflowConfig


class LocalCluster:
    """An embedded cluster: a coordinator in this process and ``config.workers`` worker processes.

    Workers start as ``python -m runtime.cluster.worker`` with this process's import
    path (so they can import the user's modules too), never by re-importing
    the user's main module, so job scripts need no ``if __name__ ==
    "__main__"`` guard. They die with this process (PR_SET_PDEATHSIG) and
    ignore Ctrl-C, which the coordinator handles by tearing everything down.
    """

    def __init__(self, config: ShmflowConfig) -> None:
        self.config = config
        self.coordinator = Coordinator(config)
        self.processes: list[subprocess.Popen[bytes]] = []
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    def _start_workers(self) -> None:
        coord = self.coordinator
        env = dict(os.environ)
        env["PYTHONHASHSEED"] = env.get("PYTHONHASHSEED") or "0"  # hash partitioning needs one seed
        # The directory holding this process's `runtime` package comes first: the workers must run the same
        # shmflow as this process (frames and messages are versioned), even where the working directory holds
        # another checkout's `runtime/`.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [_RUNTIME_ROOT, os.getcwd(), *sys.path] if p)
        for wid in range(self.config.workers):
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.cluster.worker", str(wid), coord.endpoint, str(os.getpid()),
                 str(self.config.max_message_size)],
                stdin=subprocess.PIPE, env=env)
            assert proc.stdin is not None
            proc.stdin.write(coord.secret.hex().encode() + b"\n")  # the secret never shows in `ps`
            proc.stdin.close()
            self.processes.append(proc)
        coord.wait_workers_attached(len(self.processes), processes=self.processes)
        for wid, handle in coord.workers.items():
            handle.process = self.processes[wid]
        coord.region.unlink()  # every worker has mapped it: the name is no longer needed

    def close(self) -> None:
        try:
            self.coordinator.close()
        finally:
            for proc in self.processes:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LocalCluster"]

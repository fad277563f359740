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
import time
from typing import TYPE_CHECKING

from runtime.cluster.coordinator import STARTUP_TIMEOUT, Coordinator
from runtime.errors import WorkerLostError

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
        self._region_fd: int | None = None  # kept open to start replacements after the name is gone
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONHASHSEED"] = env.get("PYTHONHASHSEED") or "0"  # hash partitioning needs one seed
        # The directory holding this process's `runtime` package comes first: the workers must run the same
        # shmflow as this process (frames and messages are versioned), even where the working directory holds
        # another checkout's `runtime/`.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [_RUNTIME_ROOT, os.getcwd(), *sys.path] if p)
        return env

    def _spawn(self, wid: int, *, region_fd: int | None = None) -> subprocess.Popen[bytes]:
        coord = self.coordinator
        args = [sys.executable, "-m", "runtime.cluster.worker", str(wid), coord.endpoint, str(os.getpid()),
                str(self.config.max_message_size)]
        if region_fd is not None:
            args.append(str(region_fd))
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, env=self._env(),
                                pass_fds=() if region_fd is None else (region_fd,))
        assert proc.stdin is not None
        proc.stdin.write(coord.secret.hex().encode() + b"\n")  # the secret never shows in `ps`
        proc.stdin.close()
        return proc

    def _start_workers(self) -> None:
        coord = self.coordinator
        for wid in range(self.config.workers):
            self.processes.append(self._spawn(wid))
        coord.wait_workers_attached(len(self.processes), processes=self.processes)
        for wid, handle in coord.workers.items():
            handle.process = self.processes[wid]
        self._region_fd = coord.region.open_fd()
        coord.region.unlink()  # every worker has mapped it: the name is no longer needed
        coord.replace_worker = self.replace_worker

    def replace_worker(self, wid: int) -> None:
        """Start a new worker ``wid`` in place of a lost one (a job restart); it maps the region through the
        descriptor this cluster kept. Returns once it registered (the coordinator waits for it to attach)."""
        old = self.processes[wid]
        if old.poll() is None:
            old.kill()
        old.wait(5)
        proc = self._spawn(wid, region_fd=self._region_fd)
        self.processes[wid] = proc
        coord = self.coordinator
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while wid not in coord.workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                msg = f"replacement worker {wid} (pid {proc.pid}) did not register (exit code {proc.poll()})"
                raise WorkerLostError(msg, worker_id=wid, pid=proc.pid, exitcode=proc.poll())
            coord.poll(0.1)
        coord.workers[wid].process = proc

    def close(self) -> None:
        if self._region_fd is not None:
            os.close(self._region_fd)
            self._region_fd = None
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

"""What the dashboard costs a running job: W3 with and without ``--ui``, alternating, in one invocation.

Imports: runtime.api, runtime.bench.shmflow_runs, runtime.bench.workloads.

``python -m runtime.bench.ui_cost [--pairs N] [--quick]``. A "with" run serves the dashboard
(``ui=True``) and, in a separate process as a browser would be, keeps its event stream open and
scrapes ``/metrics`` once a second. Runs alternate so that drift in the machine's load affects both
sides alike; the table shows each run's words per second and the medians. The target: the dashboard
costs at most 3% of W3's throughput.
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import subprocess
import sys
import textwrap
from typing import Any

from runtime.api import StreamEnvironment
from runtime.bench.shmflow_runs import _identity, _tokens, w3_input
from runtime.bench.workloads import w3_check

#: The dashboard's client: the event stream open, /metrics scraped every second, until killed.
_CLIENT = textwrap.dedent("""
    import sys, threading, time, urllib.request
    url = sys.argv[1]
    def events():
        while True:
            try:
                with urllib.request.urlopen(url + "events", timeout=30) as stream:
                    for _ in stream:
                        pass
            except OSError:
                time.sleep(0.1)
    threading.Thread(target=events, daemon=True).start()
    while True:
        try:
            urllib.request.urlopen(url + "metrics", timeout=30).read()
        except OSError:
            pass
        time.sleep(1)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_once(path: str, ref: dict[str, int], *, ui: bool, workers: int) -> tuple[float, float, float]:
    """One W3 job: its words per second (the job's timed part, as ``shmflow bench w3`` measures it), the CPU
    seconds of this (the coordinator's) process, and of its workers, during the job."""
    port = _free_port()
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, f"http://127.0.0.1:{port}/"]) if ui else None
    try:
        env = StreamEnvironment(workers=workers, ui=ui, config={"rest.port": port})
        out = env.read_text(path).flat_map(_tokens).key_by(_identity).count().collect()
        own, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        result = env.execute("bench-w3-ui" if ui else "bench-w3")
        own, children = _cpu(resource.RUSAGE_SELF) - own, _cpu(resource.RUSAGE_CHILDREN) - children  # workers reaped
    finally:
        if client is not None:
            client.kill()
            client.wait(5)
    if not w3_check(dict(out.values()), ref):
        msg = "W3's counts are wrong"
        raise AssertionError(msg)
    return sum(ref.values()) / float(result.metrics["timed_seconds"]), own, children


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.ui_cost")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tenth of the corpus")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    path, ref = w3_input(args.quick, None)
    run_once(str(path), ref, ui=False, workers=args.workers)  # warm-up
    runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for i in range(args.pairs):
        for ui in ((False, True) if i % 2 == 0 else (True, False)):
            rate, own, workers_cpu = run_once(str(path), ref, ui=ui, workers=args.workers)
            runs[ui].append((rate, own, workers_cpu))
            print(f"pair {i + 1}: {'with --ui   ' if ui else 'without --ui'} {rate / 1e6:6.3f} M words/s, "
                  f"coordinator CPU {own:6.3f} s, workers' CPU {workers_cpu:6.2f} s", flush=True)

    def median(ui: bool, i: int) -> float:
        return statistics.median(run[i] for run in runs[ui])

    without, with_ui = median(False, 0), median(True, 0)
    extra_cpu = median(True, 1) - median(False, 1)
    summary: dict[str, Any] = {"without_ui": without, "with_ui": with_ui, "cost": 1 - with_ui / without,
                               "server_cpu_share": extra_cpu / median(False, 2)}
    print(f"median without --ui {without / 1e6:.3f} M words/s, with --ui {with_ui / 1e6:.3f} M words/s: "
          f"{100 * summary['cost']:+.1f}% (target <= 3%); the server's CPU (coordinator with minus without): "
          f"{extra_cpu:.3f} s, {100 * summary['server_cpu_share']:.2f}% of the workers' CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

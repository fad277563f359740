"""The ``shmflow`` command: run | coordinator | worker | bench | status | sweep | layout | config.

Imports: any runtime module, lazily inside each subcommand, so ``shmflow --help``
stays fast and a subcommand's imports cannot break another's.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from runtime._version import __version__

if TYPE_CHECKING:
    from runtime.config import ShmflowConfig


def _cmd_status(args: argparse.Namespace) -> int:
    from runtime.memory import list_regions
    regions = list_regions()
    if args.json:
        print(json.dumps(regions, indent=2))
    elif not regions:
        print("no shmflow regions in /dev/shm")
    else:
        from runtime.memory import format_bytes
        for r in regions:
            state = "orphaned (creator dead)" if r["orphaned"] else f"creator pid {r['creator_pid']}"
            print(f"{r['name']:40} {format_bytes(r['bytes']):>10}  {state}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from runtime.io import sweep_spill_dirs
    from runtime.memory import sweep
    removed = sweep()
    for directory in load_cli_config(args, check_shm=False).tmp_dirs:
        removed += sweep_spill_dirs(directory)
    for name in removed:
        print(f"removed {name}")
    if not removed:
        print("nothing to sweep: every shmflow region and spill directory has a live creator")
    return 0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every config-reading command takes: --config FILE, -D key=value, --workers N."""
    parser.add_argument("--config", default=None, metavar="FILE", help="TOML configuration file")
    parser.add_argument("-D", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a configuration key (repeatable); wins over file and environment")
    parser.add_argument("--workers", type=int, default=None, help="number of worker processes")


def load_cli_config(args: argparse.Namespace, *, check_shm: bool = True) -> ShmflowConfig:
    """The effective configuration: defaults < TOML < SHMFLOW_* env < -D flags < --workers."""
    from runtime.config import load_config, parse_cli_overrides
    overrides = parse_cli_overrides(args.overrides)
    if args.workers is not None:
        overrides["workers"] = str(args.workers)
    return load_config(args.config, overrides=overrides, check_shm=check_shm)


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_cli_config(args)
    if args.json:
        print(json.dumps({k: {"value": v, "source": cfg.source(k)} for k, v in cfg.as_dict().items()}, indent=2))
    else:
        print(cfg.describe())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Run a job script with the CLI's configuration as the default for every StreamEnvironment in it."""
    import os
    import runpy
    from pathlib import Path

    from runtime.config import parse_cli_overrides
    load_cli_config(args)  # validate before anything starts: a bad flag fails here, with its key
    for key, value in parse_cli_overrides(args.overrides).items():
        os.environ["SHMFLOW_" + key.upper().replace(".", "_").replace("-", "_")] = str(value)
    if args.workers is not None:
        os.environ["SHMFLOW_WORKERS"] = str(args.workers)
    if args.from_checkpoint:
        from runtime.checkpoint import load_checkpoint
        from runtime.errors import CheckpointError
        try:
            load_checkpoint(args.from_checkpoint, verify_state=False)
        except CheckpointError as exc:
            print(f"shmflow run: --from-checkpoint: {exc}", file=sys.stderr)
            return 2
        os.environ["SHMFLOW_EXECUTION_SAVEPOINT_PATH"] = str(Path(args.from_checkpoint).resolve())
    if args.config:
        os.environ["SHMFLOW_CONFIG"] = str(Path(args.config).resolve())
    if args.ui or args.ui_linger is not None:
        from runtime.api import UI_ENV, UI_LINGER_ENV
        os.environ[UI_ENV] = "1"
        os.environ[UI_LINGER_ENV] = str(args.ui_linger or 0)
    script = Path(args.job).resolve()
    if not script.is_file():
        print(f"shmflow run: no such job script: {args.job}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    """List the checkpoints under a directory: job, id, time, size, whether complete, sources' positions."""
    import json
    import time

    from runtime.checkpoint import default_checkpoints_dir, list_checkpoints, load_checkpoint
    from runtime.cluster.checkpoints import SOURCES_KEY
    from runtime.errors import CheckpointError
    from runtime.memory.units import format_bytes
    cfg = load_cli_config(args, check_shm=False)
    root = args.dir or cfg.checkpoints_dir or default_checkpoints_dir()
    try:
        infos = list_checkpoints(root)
    except CheckpointError as exc:
        print(f"shmflow checkpoints: {exc}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for info in infos:
        sources: dict[str, Any] = {}
        if info.complete:
            try:
                sources = load_checkpoint(info.path, verify_state=False).metadata.extra.get(SOURCES_KEY, {})
            except CheckpointError:
                pass
        rows.append({"job": info.job_id, "checkpoint": info.checkpoint_id, "time": info.timestamp,
                     "bytes": info.nbytes, "complete": info.complete, "path": str(info.path),
                     "problem": info.problem, "sources": sources})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no checkpoints in {root}")
        return 0
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"])) if row["time"] else "?"
        state = "complete" if row["complete"] else f"INCOMPLETE ({row['problem'] or 'no _metadata'})"
        print(f"{row['job']}  chk-{row['checkpoint']}  {when}  {format_bytes(row['bytes']):>10}  {state}")
        print(f"    {row['path']}")
        for subtask, position in sorted(row["sources"].items()):
            print(f"    source {subtask}: position {position!r}")
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    import logging
    import signal

    from runtime.cluster import protocol as control
    from runtime.cluster.coordinator import Coordinator
    logging.basicConfig(level=logging.INFO, format="coordinator: %(message)s")
    cfg = load_cli_config(args)
    secret = control.load_or_create_secret(args.secret_file)
    coord = Coordinator(cfg, endpoint=args.bind, secret=secret)
    web = None
    if not args.no_ui:
        from runtime.errors import ConfigError
        from runtime.web.server import WebServer
        try:
            web = WebServer(coord, address=cfg.rest_address, port=cfg.rest_port, prom_port=cfg.prom_port)
        except ConfigError as exc:
            coord.close()
            print(f"shmflow coordinator: {exc}", file=sys.stderr)
            return 2
    stopping: list[bool] = []
    for signum in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C or kill: stop serving, then tear down
        signal.signal(signum, lambda *_: stopping.append(True))
    print(f"coordinator listening on {coord.endpoint}; region {coord.region.name} "
          f"({cfg.workers} worker arenas); secret in {args.secret_file or control.DEFAULT_SECRET_FILE}", flush=True)
    if web is not None:
        print(f"dashboard and REST API on {web.url} (metrics at {web.url}metrics)", flush=True)
    try:
        coord.serve(stop=lambda: bool(stopping))
    finally:
        if web is not None:
            web.close()
        coord.close()
        print("coordinator stopped; region unlinked", flush=True)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    import os
    import signal
    if os.environ.get("PYTHONHASHSEED") != "0":
        # Hash partitioning needs one hash seed across all workers: restart with it fixed.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, "-m", "runtime.cli", *sys.argv[1:]], env)
    from runtime.cluster import protocol as control
    from runtime.cluster.worker import worker_main
    secret = control.load_or_create_secret(args.secret_file, create=False)
    cfg = load_cli_config(args, check_shm=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        worker_main(-1, args.coordinator, secret, max_message_size=cfg.max_message_size)
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_layout(args: argparse.Namespace) -> int:
    if args.coordinator:  # live: how a standing cluster's region is carved now, operators' pages included
        from runtime.cluster.layout import inspect_cluster, render_live_layout
        from runtime.errors import TransportError
        cfg = load_cli_config(args, check_shm=False)
        try:
            layout = inspect_cluster(args.coordinator, secret_file=args.secret_file, timeout=args.timeout,
                                     max_message_size=cfg.max_message_size)
        except TransportError as exc:
            print(f"shmflow layout: {exc}", file=sys.stderr)
            return 1
        print(render_live_layout(layout, width=args.width))
        return 0
    from runtime.cluster.layout import render_cluster_layout
    print(render_cluster_layout(load_cli_config(args), width=args.width))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from runtime.bench import runner
    return runner.run(args)


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        msg = f"must be a number of seconds >= 0; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmflow",
        description="A streaming runtime whose worker processes share one memory region.",
    )
    parser.add_argument("--version", action="version", version=f"shmflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a job script on an embedded local cluster")
    p.add_argument("job", help="path of the job script")
    add_config_arguments(p)
    p.add_argument("--from-checkpoint", default=None, metavar="PATH",
                   help="start from a retained checkpoint (a chk-N directory or its _metadata; see `shmflow "
                        "checkpoints`); sets execution.savepoint.path")
    p.add_argument("--ui", action="store_true",
                   help="serve the live dashboard, REST API and /metrics while the job runs (rest.address, rest.port)")
    p.add_argument("--ui-linger", type=_seconds, default=None, metavar="SECONDS",
                   help="keep the dashboard up this long after the job ends (implies --ui)")
    p.add_argument("args", nargs="*", help="arguments for the job script (after --)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("checkpoints", help="list retained checkpoints: time, size, sources' positions")
    p.add_argument("dir", nargs="?", default=None,
                   help="a checkpoints directory or one job's (default: state.checkpoints.dir)")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_checkpoints)

    p = sub.add_parser("coordinator", help="start a standing coordinator (workers join with `shmflow worker`)")
    p.add_argument("--bind", default="tcp://127.0.0.1:6123", help="endpoint to listen on (default loopback only)")
    p.add_argument("--no-ui", action="store_true",
                   help="serve no dashboard, REST API or /metrics (default: on rest.address, rest.port)")
    p.add_argument("--secret-file", default=None, help="cluster secret (created 0600 if missing; "
                                                        "default ~/.shmflow/cluster.secret)")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_coordinator)

    p = sub.add_parser("worker", help="start a worker that joins a standing coordinator")
    p.add_argument("--coordinator", required=True, help="the coordinator's endpoint, e.g. tcp://127.0.0.1:6123")
    p.add_argument("--secret-file", default=None, help="the cluster secret the coordinator uses")
    add_config_arguments(p)  # cluster.max-message-size (the rest comes from the coordinator)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("bench", help="measure cross-process throughput against baselines")
    from runtime.bench.runner import add_arguments as add_bench_arguments
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("status", help="list shmflow regions in /dev/shm and their creators")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("sweep", help="remove regions and spill directories whose creating process is dead")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("layout", help="draw how the region is carved into arenas, buffer pools, operators' managed "
                                      "pages and free blocks (planned from the configuration, or live)")
    add_config_arguments(p)
    p.add_argument("--width", type=int, default=64, help="characters per bar")
    p.add_argument("--coordinator", default=None, metavar="ENDPOINT",
                   help="draw a standing cluster's region as it is now, e.g. tcp://127.0.0.1:6123 (each worker's "
                        "arena as of its last heartbeat: network buffers, each operator's managed pages, free)")
    p.add_argument("--secret-file", default=None, help="the cluster secret (with --coordinator)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator's answer")
    p.set_defaults(func=_cmd_layout)

    p = sub.add_parser("config", help="print the effective configuration and where each value came from")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.args = [a for a in [*args.args, *extra] if a != "--"]
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from runtime.errors import ConfigError
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"shmflow: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]

"""``shmflow bench``: the runner's JSON, ratios, table and exit status, at tiny volumes.

Benchmarks are not tests: nothing here looks at a figure's size, only at its
presence, its spread's order and the verdicts. ``--tiny`` (hidden) shrinks every
workload; ``--corrupt NAME`` (hidden) perturbs the answer of the contenders
whose name contains NAME after they ran, before they are checked.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.bench import runner
from runtime.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_all_tiny_writes_json_with_spreads_ratios_versions_and_a_plot(tmp_path):
    import importlib.util
    plotting = importlib.util.find_spec("matplotlib") is not None  # the optional `bench` extra
    report, png = tmp_path / "bench.json", tmp_path / "bench.png"
    out = bench("all", "--tiny", "--json", str(report), *(("--plot", str(png)) if plotting else ()), timeout=300)
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAILED")]
    assert out.returncode == 0, "\n".join(failed) or out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["ok"] is True
    assert data["params"]["workloads"] == list(runner.WORKLOADS)
    assert data["params"]["reps"] == 1 and data["params"]["scale"] == "tiny"
    assert data["git_sha"] is None or isinstance(data["git_sha"], str)
    for package in ("shmflow", "python", "numpy", "pyzmq", "msgpack", "rich") + (("matplotlib",) if plotting else ()):
        assert data["versions"][package], package
    results = {r["name"]: r for r in data["results"]}
    for name in ("w1_shmflow_shm_32KiB", "w1_shmflow_shm_1MiB", "w1_shmflow_tcp_32KiB", "w1_zmq_32KiB",
                 "w1_mp_queue_1MiB", "w1_shm_ring_1MiB", "w1_copy_32MiB", "w2_shmflow_rows",
                 "w2_shmflow_columnar", "w2_zmq_columns", "w3_shmflow", "w3_mp_queue", "w4_shmflow_rows",
                 "w4_shmflow_columns", "w4_dict", "latency_shmflow", "alloc_fixed_32KiB"):
        assert name in results, name
    for r in data["results"]:
        assert r["ok"] is True, r
        assert r["unit"] and r["variant"] and r["reps"] == r["ok_reps"] == 1
        if r.get("skipped"):  # an optional baseline that is not installed (DuckDB)
            continue
        assert r["min"] <= r["median"] <= r["max"]
        assert len(r["runs"]) == 1 and r["runs"][0]["ok"] is True
    shmflow = [r for r in data["results"] if r["kind"] == "shmflow"]
    with_baselines = [r for r in shmflow if r["workload"] in ("w1", "w2", "w3")]
    assert with_baselines and all(r["ratios"] for r in with_baselines)
    for r in with_baselines:
        for other, ratio in r["ratios"].items():
            assert other in results
            assert ratio["ratio"] > 0 and ratio["min"] <= ratio["ratio"] <= ratio["max"]
    assert "combiner" in results["w3_shmflow"]["variant"]  # WORKLOADS.md: state the combiner
    lat = results["latency_shmflow"]
    assert lat["unit"] == "ms" and set(lat["figures"]) == {"p50", "p99", "max"}
    assert lat["figures"]["p50"]["median"] <= lat["figures"]["p99"]["median"] <= lat["figures"]["max"]["median"]
    targets = {t["name"]: t for t in data["targets"]}
    assert {"w1_shmflow_shm_32KiB", "w1_shmflow_shm_1MiB", "w2_shmflow_rows", "w2_shmflow_columnar",
            "w3_shmflow", "latency_shmflow", "alloc_fixed_32KiB"} <= set(targets)
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    ratio_goals = {(t["name"], t["against"]) for t in data["targets"] if "against" in t}
    assert {("w1_shmflow_shm_32KiB", "w1_zmq_32KiB"), ("w1_shmflow_shm_32KiB", "w1_inproc_32KiB"),
            ("w2_shmflow_rows", "w2_mp_queue_rows"), ("w2_shmflow_columnar", "w2_zmq_columns"),
            ("w3_shmflow", "w3_mp_queue")} <= ratio_goals
    if plotting:
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "shmflow ÷ this" in out.stdout and "GB/s" in out.stdout and "M records/s" in out.stdout
    assert "FAIL" not in out.stdout


def test_w4_tiny_spills_and_checks_its_checksums(tmp_path):
    report = tmp_path / "w4.json"
    out = bench("w4", "--tiny", "--json", str(report), timeout=300)
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAILED")]
    assert out.returncode == 0, "\n".join(failed) or out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["params"]["workloads"] == ["w4"]
    results = {r["name"]: r for r in data["results"]}
    settings = runner.w4_settings("tiny")
    for form in ("rows", "columns"):
        job = results[f"w4_shmflow_{form}"]
        assert job["ok"] is True and job["unit"] == "records/s" and job["median"] > 0
        (run,) = job["runs"]
        assert run["checksums"] == run["expected"] and run["expected"]["groups"] == settings["k"]
        assert run["params"]["managed_bytes"] == settings["managed_bytes"]
        memory = run["memory"]
        assert memory["spilled_bytes"] > 0
        assert len(memory["worker_peak_rss_bytes"]) == 2 and min(memory["worker_peak_rss_bytes"]) > 0
        assert memory["children_maxrss_bytes"] >= max(memory["worker_peak_rss_bytes"]) // 2
        assert memory["gc_pause_seconds"] >= 0
        bound = job["memory_bound"]
        assert bound["against"] == f"w4_shmflow_{form}_k{settings['bound_k']}"
        assert bound["bound_bytes"] == bound["reference_peak_bytes"] + settings["managed_bytes"] + (96 << 20)
        assert isinstance(bound["met"], bool) and bound["spilled_bytes"] > 0
        reference = results[bound["against"]]
        assert reference["ok"] is True and reference["runs"][0]["expected"]["groups"] == settings["bound_k"]
    for name in ("w4_dict", "w4_numpy", "w4_duckdb_int", "w4_duckdb_str"):
        r = results[name]
        assert r["ok"] is True
        assert r.get("skipped") or (r["median"] > 0 and r["runs"][0]["memory"]["peak_rss_bytes"] > 0)
    targets = {(t["name"], t.get("against")) for t in data["targets"]}
    assert ("w4_shmflow_rows", "w4_dict") in targets
    assert ("w4_shmflow_rows", "w4_shmflow_rows_k10000") in targets
    assert ("w4_shmflow_columns", "w4_shmflow_columns_k10000") in targets
    assert (("w4_shmflow_columns", "w4_duckdb_int") in targets) == (not results["w4_duckdb_int"].get("skipped"))
    assert "W4/W5 memory" in out.stdout and "FAIL" not in out.stdout


def test_w5_tiny_counts_in_managed_state_spills_and_checks_the_last_updates(tmp_path):
    report = tmp_path / "w5.json"
    out = bench("w5", "--tiny", "--json", str(report), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(report.read_text())
    results = {r["name"]: r for r in data["results"]}
    settings = runner.w4_settings("tiny")
    for name, backend in (("w5_shmflow_managed", "managed"), ("w5_shmflow_heap", "heap")):
        (run,) = results[name]["runs"]
        assert run["ok"] and run["checksums"] == run["expected"] and run["expected"]["groups"] == settings["k"]
        assert run["params"]["backend"] == backend and run["params"]["mode"] == "streaming"
        assert (run["memory"]["spilled_bytes"] > 0) == (backend == "managed")
    targets = {(t["name"], t.get("against")) for t in data["targets"]}
    assert ("w5_shmflow_managed", "w5_shmflow_heap") in targets
    assert ("w5_shmflow_managed", f"w5_shmflow_managed_k{settings['bound_k']}") in targets


def test_recovery_tiny_reports_checkpoint_overhead_and_the_time_to_run_again_after_a_kill(tmp_path):
    report = tmp_path / "recovery.json"
    out = bench("recovery", "--tiny", "--json", str(report), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["params"]["workloads"] == ["recovery"]
    results = {r["name"]: r for r in data["results"]}
    for workload in ("w3", "w5"):
        on, off = results[f"recovery_{workload}_checkpoints"], results[f"recovery_{workload}_plain"]
        assert on["ok"] is True and off["ok"] is True and on["median"] > 0 and off["median"] > 0
        assert on["params"]["mode"] == off["params"]["mode"] == "streaming"
        assert (on["params"]["checkpoints"], off["params"]["checkpoints"]) == (True, False)
        assert on["ratios"][off["name"]]["ratio"] > 0
        assert {"checkpoints", "checkpoint_size_bytes", "checkpoint_max_size_bytes", "checkpoint_duration_seconds"} <= set(
            on["runs"][0]["checkpointing"])
    (w5,) = results["recovery_w5_checkpoints"]["runs"]
    assert w5["checksums"] == w5["expected"]
    for name, restored in (("recovery_w5_shm", "from_memory"), ("recovery_w5_files", "from_files")):
        recovery = results[name]
        (run,) = recovery["runs"]
        assert recovery["ok"] is True and recovery["unit"] == "s" and recovery["median"] > 0
        assert run["checksums"] == run["expected"]  # exactly-once across the restart
        assert len(run["attempts"]) == 2 and run["kill"]["killed_pid"] > 0
        assert run["restored"][restored] > 0 and sum(run["restored"].values()) == run["restored"][restored]
        figures = run["figures"]
        steps = ("detect_s", "replace_s", "deploy_s", "start_s", "first_record_s")
        assert all(figures[step] >= 0 for step in steps)
        assert sum(figures[step] for step in steps) == pytest.approx(figures["total_s"])
        assert 0 <= figures["restore_s"] <= figures["deploy_s"]
        assert figures["checkpoint_bytes"] > 0 and figures["checkpoint_id"] >= 1
    targets = {(t["name"], t.get("against")): t for t in data["targets"]}
    assert ("recovery_w5_shm", None) in targets
    assert {("recovery_w3_checkpoints", "recovery_w3_plain"), ("recovery_w5_checkpoints", "recovery_w5_plain")} <= set(targets)
    assert "FAIL" not in out.stdout


def test_a_wrong_answer_fails_loudly(tmp_path):
    report, name = tmp_path / "bench.json", "w3_shmflow"
    out = bench("w3", "--tiny", "--corrupt", name, "--json", str(report))
    assert out.returncode == 1, out.stdout + out.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is False
    results = {r["name"]: r for r in data["results"]}
    bad = results[name]
    assert bad["ok"] is False and bad["errors"] and bad["median"] is None
    assert bad["target"]["met"] is False
    assert all(r["ok"] for r in data["results"] if r["name"] != name)
    assert "FAIL" in out.stdout and f"FAILED {name}" in out.stdout


@pytest.mark.parametrize("run", ["w1_shm", "w2_rows_job", "w2_columnar_job", "latency_job", "w4_job"])
def test_each_check_catches_a_corrupted_answer(run):
    from runtime.bench import shmflow_runs

    if run == "w4_job":
        fn = functools.partial(shmflow_runs.w4_job, "rows", n=20_000, k=8_000, managed_bytes=1 << 20)
    elif run.startswith("w1"):
        def fn(**kw):
            return shmflow_runs.w1_shmflow(32 << 10, transport=run[3:], total_bytes=1 << 20, **kw)
    else:
        fn = getattr(shmflow_runs, run)
        fn = functools.partial(fn, **({"count": 300} if run == "latency_job" else {"n": 5_000}))
    good, bad = fn(), fn(corrupt=True)
    assert good["ok"] is True, good.get("error")
    assert bad["ok"] is False and bad["error"]


def test_plot_without_matplotlib_names_the_install_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    args = build_parser().parse_args(["bench", "alloc", "--tiny", "--plot", str(tmp_path / "x.png")])
    assert runner.run(args) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install -e '.[bench]'" in err
    assert not (tmp_path / "x.png").exists()


def test_bench_arguments_parse():
    args = build_parser().parse_args(["bench", "w2", "--workers", "3", "--quick", "--json", "o.json",
                                      "--plot", "o.png", "--reps", "2"])
    assert (args.workload, args.workers, args.quick, args.json, args.plot, args.reps) == \
        ("w2", 3, True, "o.json", "o.png", 2)
    args = build_parser().parse_args(["bench"])
    assert args.workload == "all" and args.workers == 2 and not args.quick and not args.tiny
    assert args.corrupt is None


def _contender(name, kind, rates, *, compare=(), target=None, ok=None):
    c = runner.Contender(name, "w2", "W2 rows", kind, name, run=lambda: {}, compare=compare, target=target)
    for i, rate in enumerate(rates):
        good = True if ok is None else ok[i]
        c.records.append({"workload": "W2", "peer": kind, "variant": name, "params": {}, "seconds": 1.0,
                          "rate": rate if good else None, "unit": "records/s", "ok": good, "rep": i})
    return c


def test_summary_is_median_min_max_and_ratios_are_of_medians():
    base = _contender("base", "baseline", [2.0, 4.0, 3.0])
    mine = _contender("mine", "shmflow", [6.0, 9.0, 12.0], compare=("base",),
                      target=runner.Target(8.0, ">=", ">= 8"))
    rows = {r["name"]: r for r in runner.summarize([mine, base])}
    assert (rows["base"]["min"], rows["base"]["median"], rows["base"]["max"]) == (2.0, 3.0, 4.0)
    ratio = rows["mine"]["ratios"]["base"]
    assert ratio == {"ratio": 3.0, "min": 1.5, "max": 6.0}
    assert rows["mine"]["target"]["met"] is True and rows["mine"]["ok"] is True


def test_ratio_targets_compare_medians_with_a_baseline_of_the_same_run():
    base = _contender("base", "baseline", [2.0, 4.0, 3.0])
    mine = _contender("mine", "shmflow", [6.0, 9.0, 12.0], compare=("base",))
    mine.ratio_targets = (runner.RatioTarget("base", 3.0, "≥ 3× base"), runner.RatioTarget("base", 3.5, "≥ 3.5× base"))
    (row, _) = runner.summarize([mine, base])
    assert [(t["ratio"], t["met"]) for t in row["ratio_targets"]] == [(3.0, True), (3.0, False)]
    failed = _contender("mine", "shmflow", [9.0, 9.0], ok=[True, False], compare=("base",))
    failed.ratio_targets = (runner.RatioTarget("base", 1.0, "≥ 1× base"),)
    (row, _) = runner.summarize([failed, base])
    assert row["ratio_targets"][0]["met"] is False  # a failed repetition fails every target


def test_one_failed_repetition_fails_the_contender_and_its_target():
    mine = _contender("mine", "shmflow", [9.0, 9.0, 9.0], ok=[True, False, True],
                      target=runner.Target(8.0, ">=", ">= 8"))
    (row,) = runner.summarize([mine])
    assert row["ok"] is False and row["ok_reps"] == 2 and row["median"] == 9.0
    assert row["target"]["met"] is False


def test_repetitions_interleave_per_workload():
    calls = []

    def make(name, workload):
        c = runner.Contender(name, workload, workload, "baseline", name,
                             run=lambda: calls.append(name) or {"ok": True, "rate": 1.0, "unit": "x"})
        return c

    contenders = [make("a", "w1"), make("b", "w1"), make("c", "w2")]
    runner.run_contenders(contenders, reps=2, warmup=False)
    assert calls == ["a", "b", "a", "b", "c", "c"]


def test_git_sha_is_a_sha_in_a_checkout_or_none():
    sha = runner.git_sha()
    if (ROOT / ".git").exists():
        assert sha and len(sha.split("+")[0]) == 40
    else:
        assert sha is None


def test_alternate_puts_shmflow_and_baselines_in_turn():
    s = [argparse.Namespace(n=f"s{i}") for i in range(2)]
    b = [argparse.Namespace(n=f"b{i}") for i in range(3)]
    assert [x.n for x in runner._alternate(s, b)] == ["s0", "b0", "s1", "b1", "b2"]

"""The installed command and the examples, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import __version__

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_shmflow_help_and_version():
    out = run(sys.executable, "-m", "runtime.cli", "--help")
    assert out.returncode == 0
    for command in ("run", "coordinator", "worker", "bench", "status", "config"):
        assert command in out.stdout
    out = run(sys.executable, "-m", "runtime.cli", "--version")
    assert out.stdout.strip() == f"shmflow {__version__}"


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "shmflow"
    if not exe.exists():
        pytest.skip("console script not on this interpreter's bin path (not installed with pip)")
    out = run(str(exe), "--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_memory_demo_runs():
    out = run(sys.executable, "examples/memory_demo.py")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    summed = next(line for line in out.stdout.splitlines() if "summed the segment" in line)
    got, expected = summed.split(": ")[1].split(" (expected ")
    assert got == expected.rstrip(")")
    assert "one free block of 64 MiB" in out.stdout


def test_alloc_benchmark_prints_json():
    out = run(sys.executable, "-m", "runtime.bench.alloc", "--quick")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["unit"] == "allocate+free pairs/s"
    assert all(r["pairs_per_s"] > 0 for r in report["results"].values())


def test_status_lists_a_live_region():
    from runtime.memory import SharedRegion
    with SharedRegion.create(1 << 20) as region:
        out = run(sys.executable, "-m", "runtime.cli", "status", "--json")
        entries = {r["name"]: r for r in json.loads(out.stdout)}
        assert entries[region.name]["creator_pid"] == os.getpid()
        assert entries[region.name]["orphaned"] is False


def test_config_command_prints_values_and_sources(tmp_path):
    toml = tmp_path / "shmflow.toml"
    toml.write_text('[memory]\nregion.size = "128mb"\n')
    env = {**os.environ, "SHMFLOW_NETWORK_BUFFER_TIMEOUT": "5ms"}
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "config", "--config", str(toml),
                          "-D", "workers=3", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["memory.region.size"] == {"value": 128 << 20, "source": f"file {toml}"}
    assert report["network.buffer-timeout"]["source"] == "env SHMFLOW_NETWORK_BUFFER_TIMEOUT"
    assert report["workers"]["value"] == 3


def test_config_command_rejects_bad_values_with_the_key():
    out = run(sys.executable, "-m", "runtime.cli", "config", "-D", "memory.segment.size=3000")
    assert out.returncode == 2
    assert "memory.segment.size must be a power of two" in out.stderr and "got 3000" in out.stderr


def test_layout_command_draws_arenas_pools_and_free_blocks():
    out = run(sys.executable, "-m", "runtime.cli", "layout", "--workers", "2", "-D", "memory.region.size=64mb",
              "-D", "memory.network.min=1mb", "--width", "32")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("region (coordinator's allocator): [0x0, 0x4000000) 64 MiB")
    assert lines[1] == "  |" + "A" * 16 + "B" * 16 + "|"
    assert "A worker-0 arena" in out.stdout and "worker-1 network buffers" in out.stdout
    assert "free: " in out.stdout and out.stdout.rstrip().endswith("(memory.managed.fraction)")


def test_progress_line_names_operators_and_counts():
    from runtime.cluster.progress import progress_line
    line = progress_line("wc", 3.21, {"read_text -> flat_map": [1204, 9811], "count": [9811, 0]})
    assert line == "[wc 3.2s] read_text -> flat_map: 1,204 in / 9,811 out | count: 9,811 in / 0 out"
    assert len(progress_line("wc", 1.0, {"x" * 40: [1, 2]} , width=30)) == 30


def test_an_allocator_snapshot_travels_as_plain_data_and_a_malformed_one_is_refused(tmp_path):
    from runtime.errors import ProtocolError
    from runtime.memory import BuddyAllocator, SharedRegion
    from runtime.memory.layout import AllocatorSnapshot, render_layout

    with SharedRegion.create(1 << 20) as region:
        alloc = BuddyAllocator(region, 4096)
        segs = [alloc.allocate(4096, owner="op[0]") for _ in range(3)] + [alloc.allocate(65536, owner="net")]
        snap = AllocatorSnapshot.of(alloc)
        assert snap.by_owner() == {"op[0]": (3 * 4096, 3), "net": (65536, 1)}
        assert snap.runs[0][2:] == ("op[0]", 3)  # adjacent blocks of one owner are one run
        assert AllocatorSnapshot.from_wire(snap.to_wire()) == snap
        assert render_layout([("arena", snap)]) == render_layout([("arena", alloc)])
        assert snap.free_bytes == alloc.free_bytes
        for seg in segs:
            seg.free()
    for bad in (None, [0, 1, 2], [0, 1, 2, [["x", 1, "o", 1]], []], [0, 1, 2, [], [[0]]], [0, 1, True, [], []]):
        with pytest.raises(ProtocolError, match="an allocator snapshot must be"):
            AllocatorSnapshot.from_wire(bad)


def test_state_stats_travel_as_plain_data_and_are_drawn_under_their_operators_pages():
    from runtime.cluster.layout import render_state
    from runtime.errors import ProtocolError
    from runtime.memory.layout import AllocatorSnapshot, render_layout
    from runtime.state.backend import BackendStats

    stats = BackendStats("managed", 1500, 65536, 8192, cache_hits=900, cache_misses=100,
                         bins=((32, 1000, 27_000, 2048), (0, 2, 10_000, 2)))
    assert BackendStats.from_wire(stats.to_wire()) == stats
    assert render_state(stats) == [
        "managed state: 1,500 entries, 64 KiB in memory, 8 KiB on disk, cache hit rate 90% of 1,000 reads",
        "     bin    objects  bytes used      slots  fill",
        "    32 B      1,000    26.4 KiB      2,048   49%",
        "   large          2     9.8 KiB          2  100%",
    ]
    assert render_state(BackendStats("managed", 0, 0))[0].endswith("0 B on disk, no reads yet")
    snap = AllocatorSnapshot(0, 1 << 20, 4096, ((0, 65536, "net", 1), (65536, 8192, "process[0]", 2)),
                             ((1 << 19, 1 << 19),))
    text = render_layout([("arena", snap)], details={"process[0]": ["line one", "line two"], "gone[1]": ["x"]})
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if "process[0]" in line)
    assert lines[at + 1:at + 3] == ["      line one", "      line two"] and "x" not in lines
    for bad in (None, ["managed", 1, 2, 3, 4, 5], ["managed", 1, 2, 3, 4, True, []], [1, 1, 2, 3, 4, 5, []],
                ["managed", 1, 2, 3, 4, 5, [[32, 1, 2]]]):
        with pytest.raises(ProtocolError, match=r"^state stats must be \[backend, entries"):
            BackendStats.from_wire(bad)


def test_the_summary_shows_each_operators_state_with_its_cache_hit_rate_and_each_workers_gc_pauses():
    from runtime.cluster.progress import render_summary, summarize

    def subtask(hits, misses, objects):
        return {"records_in": 10, "records_out": 10, "state_entries": 3, "state_bytes_in_memory": 32768,
                "state_bytes_on_disk": 4096, "state_cache_hits": hits, "state_cache_misses": misses,
                "state_bin_32_objects": objects, "state_bin_32_bytes": 30 * objects, "state_bin_32_slots": 1024}

    def worker(gc):
        return {"peak_rss_bytes": 64 << 20, "gc_pause_seconds": gc, "network_peak_bytes": 1 << 20,
                "managed_peak_bytes": 32768}

    metrics = summarize({0: {"process[0]": subtask(290, 10, 2), "map[0]": {"records_in": 5, "records_out": 5},
                             "__worker__": worker(0.25)},
                         1: {"process[1]": subtask(0, 0, 1), "map[1]": {"records_in": 5, "records_out": 5},
                             "__worker__": worker(0.5)}}, 1.0)
    assert metrics["operators"]["process"]["state_cache_hit_rate"] == 290 / 300
    assert "state_cache_hit_rate" not in metrics["operators"]["map"]  # no keyed state
    lines = render_summary("j", 1.0, metrics).splitlines()
    assert lines[2:] == [
        "  worker 0: GC pauses 0.25s, peak RSS 64 MiB, managed peak 32 KiB, network peak 1 MiB",
        "  worker 1: GC pauses 0.50s, peak RSS 64 MiB, managed peak 32 KiB, network peak 1 MiB",
        "  process: 20 in, 20 out",
        "    state: 6 entries, 64 KiB in memory, 8 KiB on disk; cache hit rate 96.7% of 300 reads",
        "    state bins: 32 B 3 (0% full)",
        "  map: 10 in, 10 out",
    ]
    heap = summarize({0: {"process[0]": {"state_entries": 3, "state_cache_hits": 0, "state_cache_misses": 0}}}, 1.0)
    assert heap["operators"]["process"]["state_cache_hit_rate"] == 1.0  # no read counted: none went to disk
    assert "no reads counted" in render_summary("j", 1.0, heap)
    fixed = summarize({0: {"count[0]": {"state_entries": 3, "state_partition_loads": 2}}}, 1.0)
    assert "state_cache_hit_rate" not in fixed["operators"]["count"]  # it loads whole partitions: no read count
    assert render_summary("j", 1.0, fixed).endswith("; 2 partitions read back from disk")

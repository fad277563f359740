"""Tests for runtime.config: parsing tables, precedence, messages, combinations, memory plan."""

from __future__ import annotations

import dataclasses
import pickle
import re
import tempfile
import typing
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import runtime.config as config_module
from runtime.config import (
    KEYS,
    MemoryPlan,
    ShmflowConfig,
    format_duration,
    format_size,
    load_config,
    parse_cli_overrides,
    parse_duration,
    parse_size,
)
from runtime.errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZE_RULE = "must be a byte count or a size such as 64mb, 64 MiB, 1 GiB, 512k (k = 1024)"
DURATION_RULE = "must be a duration such as 100ms, 1 s, 0, or a number of seconds"
NEGATIVE = "must be >= 0 (negative values are invalid)"


def cfg_of(values: dict[str, object] | None = None) -> ShmflowConfig:
    return ShmflowConfig.from_mapping(values or {}, source="test", check_shm=False)


def exact(msg: str) -> str:
    return f"^{re.escape(msg)}$"


@pytest.fixture
def plenty_of_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the /dev/shm check independent of the machine (containers often have 64 MB)."""
    monkeypatch.setattr(config_module, "_shm_free_bytes", lambda path="/dev/shm": 64 * GiB)


# --------------------------------------------------------------------------- value parsers


@pytest.mark.parametrize(("text", "nbytes"), [
    (4096, 4096), (0, 0), ("4096", 4096), ("0", 0), (1024.0, 1024),
    ("64mb", 64 * MiB), ("64 MB", 64 * MiB), ("64MiB", 64 * MiB), ("64m", 64 * MiB),
    ("1 GiB", GiB), ("1gb", GiB), ("1G", GiB), ("512k", 512 * KiB), ("32 KiB", 32 * KiB),
    ("4kb", 4 * KiB), ("100 TiB", 100 * TiB), ("  8 mb  ", 8 * MiB), ("1.5 GiB", 3 * GiB // 2),
    ("0.5k", 512), ("10b", 10), ("10 bytes", 10),
])
def test_parse_size(text: object, nbytes: int) -> None:
    assert parse_size(text) == nbytes


_UNITS = {"": 1, "b": 1, "k": KiB, "KB": KiB, "KiB": KiB, "m": MiB, "MB": MiB, "MiB": MiB,
          "g": GiB, "GiB": GiB, "t": TiB, "TiB": TiB}


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(_UNITS)),
       st.sampled_from(["", " ", "  "]))
def test_parse_size_property(n: int, unit: str, space: str) -> None:
    assert parse_size(f"{n}{space}{unit}") == n * _UNITS[unit]
    text = format_size(n * _UNITS[unit])
    if "." not in text:  # exact multiples round-trip; "12.8 MiB" is for humans only
        assert parse_size(text) == n * _UNITS[unit]


@pytest.mark.parametrize(("value", "rule"), [
    (-1, NEGATIVE), ("-1", NEGATIVE), ("-4kb", NEGATIVE),
    (1.5, "must be a whole number of bytes"), ("1.5b", "must be a whole number of bytes"),
    ("0.3k", "must be a whole number of bytes"),
    (True, SIZE_RULE), (False, SIZE_RULE), (None, SIZE_RULE), ("", SIZE_RULE), ("lots", SIZE_RULE),
    ("64 mega", SIZE_RULE), ("mb", SIZE_RULE), ("1e6", SIZE_RULE), ("4 4kb", SIZE_RULE),
    (float("inf"), SIZE_RULE), (float("nan"), SIZE_RULE), ([4096], SIZE_RULE),
])
def test_parse_size_rejects(value: object, rule: str) -> None:
    shown = value if isinstance(value, str) and value else repr(value)
    with pytest.raises(ConfigError, match=exact(f"size {rule}; got {shown}")):
        parse_size(value)


@pytest.mark.parametrize(("text", "seconds"), [
    ("100ms", 0.1), ("100 ms", 0.1), ("1 s", 1.0), ("1s", 1.0), ("0", 0.0), (0, 0.0),
    (2, 2.0), (0.25, 0.25), ("1.5", 1.5), ("250us", 0.00025), ("2 min", 120.0), ("1h", 3600.0),
    ("3 seconds", 3.0), ("5 MS", 0.005),
])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(("value", "rule"), [
    ("-1s", NEGATIVE), (-0.5, NEGATIVE), ("soon", DURATION_RULE), ("", DURATION_RULE),
    (True, DURATION_RULE), (None, DURATION_RULE), ("10 fortnights", DURATION_RULE),
    (float("inf"), DURATION_RULE),
])
def test_parse_duration_rejects(value: object, rule: str) -> None:
    shown = value if isinstance(value, str) and value else repr(value)
    with pytest.raises(ConfigError, match=exact(f"duration {rule}; got {shown}")):
        parse_duration(value)


@pytest.mark.parametrize(("nbytes", "text"), [
    (0, "0 B"), (100, "100 B"), (1023, "1023 B"), (4096, "4 KiB"), (32 * KiB, "32 KiB"),
    (256 * MiB, "256 MiB"), (13421772, "12.8 MiB"), (GiB, "1 GiB"), (100 * TiB, "100 TiB"),
])
def test_format_size(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text


@pytest.mark.parametrize(("seconds", "text"), [(0.0, "0 s"), (0.1, "100 ms"), (1.5, "1.5 s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --------------------------------------------------------------------------- defaults and access


def test_defaults() -> None:
    cfg = cfg_of()
    assert cfg.as_dict() == {
        "memory.region.size": 256 * MiB, "memory.min-block": 4 * KiB,
        "memory.segment.size": 32 * KiB, "memory.network.fraction": 0.1,
        "memory.network.min": 8 * MiB, "memory.network.max": GiB,
        "memory.managed.fraction": 0.4, "memory.managed.size": 0, "io.tmp-dirs": (tempfile.gettempdir(),),
        "network.buffers-per-channel": 8,
        "network.floating-buffers-per-gate": 16, "network.buffer-timeout": 0.1,
        "network.max-record-size": 64 * MiB, "network.transport": "auto",
        "rest.address": "127.0.0.1", "rest.port": 8081, "metrics.reporter.prom.port": 0,
        "cluster.max-message-size": 256 * MiB, "state.backend": "heap", "pipeline.max-parallelism": 128,
        "python.gc.young-threshold": 100_000,
        "execution.checkpointing.interval": 0.0, "execution.checkpointing.mode": "exactly-once",
        "execution.checkpointing.timeout": 600.0, "state.checkpoints.dir": "", "execution.savepoint.path": "",
        "state.checkpoints.num-retained": 1,
        "state.checkpoints.shared-memory.size": -1,
        "restart-strategy.type": "", "restart-strategy.fixed-delay.attempts": 1,
        "restart-strategy.fixed-delay.delay": 1.0, "restart-strategy.failure-rate.max-failures-per-interval": 1,
        "restart-strategy.failure-rate.failure-rate-interval": 60.0, "restart-strategy.failure-rate.delay": 1.0,
        "restart-strategy.exponential-delay.initial-backoff": 1.0,
        "restart-strategy.exponential-delay.max-backoff": 60.0,
        "restart-strategy.exponential-delay.backoff-multiplier": 1.5,
        "restart-strategy.exponential-delay.reset-backoff-threshold": 3600.0,
        "restart-strategy.exponential-delay.jitter-factor": 0.1,
        "restart-strategy.exponential-delay.attempts-before-reset-backoff": 2**31 - 1,
        "workers": 2,
    }
    assert all(cfg.source(spec.key) == "default" for spec in KEYS)


def test_max_record_size_is_a_bounded_size() -> None:
    assert cfg_of({"network.max-record-size": "1mb"}).max_record_size == MiB
    with pytest.raises(ConfigError, match=r"network\.max-record-size.*1 KiB, 4 GiB"):
        cfg_of({"network.max-record-size": "512b"})


def test_default_constructor_checks_shm(plenty_of_shm: None) -> None:
    assert ShmflowConfig() == cfg_of()


def test_access_by_key_and_attribute() -> None:
    cfg = cfg_of({"workers": 4, "memory.region.size": "64mb"})
    assert cfg["memory.region.size"] == cfg.region_size == 64 * MiB
    assert cfg.get("workers") == cfg.workers == cfg["workers"] == 4
    assert cfg.get("no.such.key", "fallback") == "fallback"
    assert "workers" in cfg and "worker" not in cfg
    with pytest.raises(KeyError, match=r"did you mean memory\.region\.size"):
        cfg["memory.region.sise"]
    with pytest.raises(KeyError, match=r"did you mean workers"):
        cfg.source("worker")
    with pytest.raises(AttributeError):
        cfg.no_such_attribute  # noqa: B018


def test_attribute_annotations_match_the_key_table() -> None:
    hints = {k: v for k, v in typing.get_type_hints(ShmflowConfig).items() if k[0] != "_"}
    kinds = {"size": int, "size-or-unset": int, "size-or-auto": int, "int": int, "fraction": float, "duration": float, "choice": str,
             "path": str, "paths": tuple[str, ...]}
    assert hints == {spec.attr: kinds[spec.kind] for spec in KEYS}
    cfg = cfg_of()
    for spec in KEYS:
        assert isinstance(getattr(cfg, spec.attr), typing.get_origin(hints[spec.attr]) or hints[spec.attr])


def test_immutable_and_replace() -> None:
    cfg = cfg_of()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del cfg.workers
    four = cfg.replace(workers=4)
    assert (cfg.workers, four.workers, four.source("workers")) == (2, 4, "code")
    bigger = four.replace(**{"memory.region.size": "1gb"})
    assert bigger.region_size == GiB and bigger.workers == 4
    assert bigger.replace(region_size=GiB) == bigger
    tcp = cfg.with_overrides({"network.transport": "TCP"}, source="cli --transport")
    assert (tcp.transport, tcp.source("network.transport")) == ("tcp", "cli --transport")
    with pytest.raises(ConfigError, match=r"workers must be an integer in \[1, 256\]; got 0"):
        cfg.replace(workers=0)


def test_as_dict_is_msgpack_able_and_rebuilds() -> None:
    cfg = cfg_of({"workers": 3, "network.buffer-timeout": "5ms", "network.transport": "shm"})
    shipped = msgpack.unpackb(msgpack.packb(cfg.as_dict()))
    rebuilt = ShmflowConfig.from_mapping(shipped, source="coordinator", check_shm=False)
    assert rebuilt == cfg and rebuilt.memory_plan() == cfg.memory_plan()
    assert rebuilt.source("workers") == "coordinator"
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_env_var_names() -> None:
    names = {spec.key: spec.env_var for spec in KEYS}
    assert names["network.buffers-per-channel"] == "SHMFLOW_NETWORK_BUFFERS_PER_CHANNEL"
    assert names["memory.region.size"] == "SHMFLOW_MEMORY_REGION_SIZE"
    assert names["workers"] == "SHMFLOW_WORKERS"
    assert len(set(names.values())) == len(KEYS)


# --------------------------------------------------------------------------- invalid values

_POW2_BLOCK = "must be a power of two in [256 B, memory.segment.size (32 KiB)]"
_POW2_SEGMENT = "must be a power of two >= memory.min-block (4 KiB)"
_FRACTION = "must be a number in [0, 1]"


@pytest.mark.parametrize(("key", "value", "rule"), [
    ("memory.region.size", 0, "must be a size > 0"),
    ("memory.region.size", "lots", SIZE_RULE),
    ("memory.region.size", "-1mb", NEGATIVE),
    ("memory.region.size", True, SIZE_RULE),
    ("memory.region.size", "1.5b", "must be a whole number of bytes"),
    ("memory.min-block", 100, _POW2_BLOCK),
    ("memory.min-block", 128, _POW2_BLOCK),
    ("memory.min-block", 3000, _POW2_BLOCK),
    ("memory.min-block", "64kb", _POW2_BLOCK),
    ("memory.segment.size", 3000, _POW2_SEGMENT),
    ("memory.segment.size", "2kb", _POW2_SEGMENT),
    ("memory.segment.size", 0, _POW2_SEGMENT),
    ("memory.network.fraction", 1.5, _FRACTION),
    ("memory.network.fraction", -0.1, _FRACTION),
    ("memory.network.fraction", "lots", _FRACTION),
    ("memory.network.fraction", "nan", _FRACTION),
    ("memory.managed.fraction", 2, _FRACTION),
    ("memory.managed.fraction", False, _FRACTION),
    ("memory.network.min", "-8mb", NEGATIVE),
    ("memory.network.min", "2gb", "must be a size <= memory.network.max (1 GiB)"),
    ("memory.network.max", "x", SIZE_RULE),
    ("memory.network.max", "4mb", "must be a size >= memory.network.min (8 MiB)"),
    ("network.buffers-per-channel", 0, "must be an integer >= 1"),
    ("network.buffers-per-channel", "two", "must be an integer >= 1"),
    ("network.floating-buffers-per-gate", -1, "must be an integer >= 0"),
    ("network.floating-buffers-per-gate", 1.0, "must be an integer >= 0"),
    ("network.buffer-timeout", "-1s", NEGATIVE),
    ("network.buffer-timeout", "soon", DURATION_RULE),
    ("network.transport", "udp", "must be one of 'auto', 'shm', 'tcp'"),
    ("network.transport", 1, "must be one of 'auto', 'shm', 'tcp'"),
    ("workers", 0, "must be an integer in [1, 256]"),
    ("workers", 257, "must be an integer in [1, 256]"),
    ("workers", 2.5, "must be an integer in [1, 256]"),
    ("workers", True, "must be an integer in [1, 256]"),
])
def test_invalid_value_message(key: str, value: object, rule: str) -> None:
    shown = value if isinstance(value, str) else repr(value)
    with pytest.raises(ConfigError, match=exact(f"{key} {rule}; got {shown} (from test)")):
        cfg_of({key: value})


def test_invalid_value_from_env_names_the_variable() -> None:
    msg = ("memory.segment.size must be a power of two >= memory.min-block (4 KiB); "
           "got 3000 (from env SHMFLOW_MEMORY_SEGMENT_SIZE)")
    with pytest.raises(ConfigError, match=exact(msg)):
        load_config(env={"SHMFLOW_MEMORY_SEGMENT_SIZE": "3000"}, check_shm=False)


def test_all_invalid_values_are_reported_together() -> None:
    with pytest.raises(ConfigError, match=r"^3 config values are invalid:\n") as info:
        cfg_of({"workers": 0, "network.transport": "udp", "memory.region.size": "lots"})
    assert str(info.value).count("(from test)") == 3


# --------------------------------------------------------------------------- combinations


@pytest.mark.parametrize(("values", "msg"), [
    ({"memory.network.fraction": 0.7},
     "memory.network.fraction + memory.managed.fraction must be <= 1 (they share each worker "
     "arena); got 0.7 (from test) + 0.4 (default) = 1.1"),
    ({"memory.network.fraction": 0.5, "memory.managed.fraction": 0.6},
     "memory.network.fraction + memory.managed.fraction must be <= 1 (they share each worker "
     "arena); got 0.5 (from test) + 0.6 (from test) = 1.1"),
    # the key the user set is blamed, with the valid range relative to the other key
    ({"memory.segment.size": "2kb"}, f"memory.segment.size {_POW2_SEGMENT}; got 2kb (from test)"),
    ({"memory.min-block": "64kb", "memory.segment.size": "32kb"},
     "memory.segment.size must be a power of two >= memory.min-block (64 KiB); "
     "got 32kb (from test)"),
    ({"memory.network.min": "2gb", "memory.network.max": "1gb"},
     "memory.network.max must be a size >= memory.network.min (2 GiB); got 1gb (from test)"),
])
def test_combination_errors(values: dict[str, object], msg: str) -> None:
    with pytest.raises(ConfigError, match=exact(msg)):
        cfg_of(values)


def test_region_too_small_for_network_buffers() -> None:
    # arena 2 MiB per worker, 10% = 204.8 KiB = 6 buffers of 32 KiB; needs 8 * 2 + 16 = 32
    values = {"memory.region.size": "4mb", "memory.network.min": 0}
    msg = ("network buffers per worker must be >= network.buffers-per-channel x workers + "
           "network.floating-buffers-per-gate = 32; got 6 buffers of 32 KiB in a 2 MiB arena from "
           "memory.region.size=4 MiB (from test), workers=2 (default), "
           "memory.network.fraction=0.1 (default), memory.network.min=0 B (from test); "
           "raise memory.region.size, memory.network.fraction or memory.network.min")
    with pytest.raises(ConfigError, match=exact(msg)):
        cfg_of(values)
    with pytest.raises(ConfigError, match=r"= 516; got 6 buffers"):  # 8 * 64 + 4 floating
        cfg_of({**values, "memory.region.size": "128mb", "workers": 64,
                "network.floating-buffers-per-gate": 4})


def test_network_and_managed_must_fit_the_arena() -> None:
    msg = ("network + managed memory per worker must fit the worker arena (8 MiB); got 8 MiB + "
           "3.2 MiB from memory.network.min=8 MiB (default), memory.managed.fraction=0.4 "
           "(default); lower memory.managed.fraction or memory.network.min, or raise "
           "memory.region.size")
    with pytest.raises(ConfigError, match=exact(msg)):
        cfg_of({"memory.region.size": "16mb"})


def test_arena_below_min_block() -> None:
    with pytest.raises(ConfigError, match=r"arena >= memory.min-block \(4 KiB\); got 2 KiB per "
                                          r"worker from memory.region.size=8 KiB \(from test\), "
                                          r"workers=4 \(from test\)"):
        cfg_of({"memory.region.size": "8kb", "workers": 4})


def test_region_larger_than_free_dev_shm() -> None:
    with pytest.raises(ConfigError, match=r"^memory\.region\.size \(plus 1% allowance\) must fit "
                                          r"the free space of /dev/shm, .*; got 100 TiB \(from "
                                          r"cli -D memory\.region\.size=100 TiB\); containers "
                                          r"often give /dev/shm only 64 MB: raise its size"):
        load_config(env={}, overrides={"memory.region.size": "100 TiB"})


@pytest.mark.parametrize(("region", "ok"), [("63mb", True), ("64mb", False), ("256mb", False)])
def test_dev_shm_allowance(monkeypatch: pytest.MonkeyPatch, region: str, ok: bool) -> None:
    monkeypatch.setattr(config_module, "_shm_free_bytes", lambda path="/dev/shm": 64 * MiB)
    values = {"memory.region.size": region, "memory.network.min": "1mb"}
    if ok:
        ShmflowConfig(values)
    else:
        with pytest.raises(ConfigError, match=r"64 MiB \(67108864 bytes\); got .* or lower "
                                              r"memory\.region\.size$"):
            ShmflowConfig(values)
    ShmflowConfig(values, check_shm=False)  # tests can opt out of the check


# --------------------------------------------------------------------------- memory plan


@pytest.mark.parametrize(("values", "plan"), [
    ({}, MemoryPlan(workers=2, region_size=256 * MiB, arena_bytes=128 * MiB, segment_size=32 * KiB,
                    min_block=4 * KiB, network_bytes_per_worker=409 * 32 * KiB,
                    network_buffers_per_worker=409, required_buffers_per_worker=32,
                    managed_bytes_per_worker=13107 * 4 * KiB)),
    # 256 MiB / 3 workers -> 64 MiB arenas; 10% = 6.4 MiB is raised to memory.network.min
    ({"workers": 3}, MemoryPlan(workers=3, region_size=256 * MiB, arena_bytes=64 * MiB,
                                segment_size=32 * KiB, min_block=4 * KiB,
                                network_bytes_per_worker=8 * MiB, network_buffers_per_worker=256,
                                required_buffers_per_worker=40,
                                managed_bytes_per_worker=6553 * 4 * KiB)),
    # one 16 GiB arena: 10% = 1.6 GiB is capped at memory.network.max
    ({"workers": 1, "memory.region.size": "16gb", "memory.segment.size": "64kb",
      "network.buffers-per-channel": 4},
     MemoryPlan(workers=1, region_size=16 * GiB, arena_bytes=16 * GiB, segment_size=64 * KiB,
                min_block=4 * KiB, network_bytes_per_worker=GiB, network_buffers_per_worker=16384,
                required_buffers_per_worker=20, managed_bytes_per_worker=1677721 * 4 * KiB)),
    # network.min larger than the arena: capped at the arena, no managed memory
    ({"workers": 4, "memory.region.size": "16mb", "memory.managed.fraction": 0},
     MemoryPlan(workers=4, region_size=16 * MiB, arena_bytes=4 * MiB, segment_size=32 * KiB,
                min_block=4 * KiB, network_bytes_per_worker=4 * MiB, network_buffers_per_worker=128,
                required_buffers_per_worker=48, managed_bytes_per_worker=0)),
])
def test_memory_plan(values: dict[str, object], plan: MemoryPlan) -> None:
    got = cfg_of(values).memory_plan()
    assert got == plan
    assert got.network_bytes_per_worker % got.segment_size == 0
    assert got.managed_bytes_per_worker % got.min_block == 0
    assert got.unused_bytes_per_worker >= 0


# --------------------------------------------------------------------------- sources and precedence


def write(tmp_path: Path, text: str, name: str = "shmflow.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TOML = """
workers = 3
[memory]
region.size = "128mb"
[network]
buffer-timeout = "5ms"
transport = "shm"
"""


@pytest.mark.parametrize(("env", "cli", "workers", "source"), [
    ({}, {}, 3, "file {path}"),
    ({"SHMFLOW_WORKERS": "4"}, {}, 4, "env SHMFLOW_WORKERS"),
    ({"SHMFLOW_WORKERS": "4"}, {"workers": "5"}, 5, "cli -D workers=5"),
    ({}, {"workers": "5"}, 5, "cli -D workers=5"),
    ({"SHMFLOW_WORKERS": ""}, {}, 3, "file {path}"),  # an empty variable counts as unset
])
def test_precedence(tmp_path: Path, env: dict[str, str], cli: dict[str, str], workers: int,
                    source: str) -> None:
    path = write(tmp_path, TOML)
    cfg = load_config(path, env=env, overrides=cli, check_shm=False)
    assert (cfg.workers, cfg.source("workers")) == (workers, source.format(path=path))
    assert (cfg.region_size, cfg.source("memory.region.size")) == (128 * MiB, f"file {path}")
    assert cfg.buffer_timeout == pytest.approx(0.005) and cfg.transport == "shm"
    assert (cfg.segment_size, cfg.source("memory.segment.size")) == (32 * KiB, "default")


def test_every_layer_can_set_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, '"memory.segment.size" = "64kb"\n')
    env = {"SHMFLOW_NETWORK_BUFFERS_PER_CHANNEL": "3", "SHMFLOW_MEMORY_NETWORK_FRACTION": "0.2"}
    cli = parse_cli_overrides(["memory.managed.fraction=0.3", "network.buffer-timeout=0"])
    cfg = load_config(path, env=env, overrides=cli, check_shm=False)
    assert cfg.source("memory.segment.size") == f"file {path}"
    assert cfg.source("network.buffers-per-channel") == "env SHMFLOW_NETWORK_BUFFERS_PER_CHANNEL"
    assert cfg.source("memory.managed.fraction") == "cli -D memory.managed.fraction=0.3"
    assert (cfg.segment_size, cfg.buffers_per_channel, cfg.network_fraction) == (64 * KiB, 3, 0.2)
    assert (cfg.managed_fraction, cfg.buffer_timeout) == (0.3, 0.0)


def test_config_path_from_env(tmp_path: Path) -> None:
    from_env = write(tmp_path, "workers = 7\n", "env.toml")
    explicit = write(tmp_path, "workers = 9\n", "explicit.toml")
    env = {"SHMFLOW_CONFIG": str(from_env)}
    assert load_config(env=env, check_shm=False).workers == 7
    assert load_config(explicit, env=env, check_shm=False).workers == 9
    assert load_config(env={}, check_shm=False) == cfg_of()


@pytest.mark.parametrize("text", [
    '[memory]\nregion.size = "64mb"\n',
    '"memory.region.size" = "64mb"\n',
    'memory.region.size = "64mb"\n',
    '[memory.region]\nsize = "64mb"\n',
    '[memory]\n"region.size" = 67108864\n',
])
def test_toml_forms_flatten(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text), env={}, check_shm=False).region_size == 64 * MiB


@pytest.mark.parametrize(("text", "pattern"), [
    ('"memory.region.size" = "64mb"\n[memory]\nregion.size = "32mb"\n',
     r"must be set once per file; got memory\.region\.size twice"),
    ("workers = \n", r"^config file must be valid TOML; got .*shmflow\.toml: "),
    ("workers = 0\n", r"^workers must be an integer in \[1, 256\]; got 0 \(from file .*\)$"),
])
def test_bad_toml(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text), env={}, check_shm=False)


def test_missing_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file must be readable; got .*nope\.toml: "):
        load_config(tmp_path / "nope.toml", env={}, check_shm=False)


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("text", "pattern"), [
    ('[memory]\nregion.sise = "64mb"\n',
     r"got memory\.region\.sise \(from file .*\); did you mean memory\.region\.size\?"),
    ("worker = 3\n", r"got worker \(from file .*\); did you mean workers\?"),
    ("[network]\nbuffers-per-chanel = 3\n", r"got .*; did you mean network\.buffers-per-channel\?"),
])
def test_unknown_key_in_toml(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"^config key must be a known key; " + pattern):
        load_config(write(tmp_path, text), env={}, check_shm=False)


@pytest.mark.parametrize(("var", "suggestion"), [
    ("SHMFLOW_WORKER", "SHMFLOW_WORKERS"),
    ("SHMFLOW_MEMORY_REGION_SIZ", "SHMFLOW_MEMORY_REGION_SIZE"),
    ("SHMFLOW_NETWORK_BUFFER_TIMEOUT_MS", "SHMFLOW_NETWORK_BUFFER_TIMEOUT"),
])
def test_unknown_env_var(var: str, suggestion: str) -> None:
    msg = (f"environment variable {var} must name a config key (SHMFLOW_ + key with . and - as _)"
           f"; did you mean {suggestion}?")
    with pytest.raises(ConfigError, match=exact(msg)):
        load_config(env={var: "1"}, check_shm=False)


def test_non_config_env_vars_are_ignored() -> None:
    env = {"SHMFLOW_SHM_PREFIX": "t123", "SHMFLOW_TEST_SEED": "7", "SHMFLOW_INTERNAL_ROLE": "w",
           "PATH": "/bin", "SHMFLOWX": "1", "SHMFLOW_WORKERS": "3"}
    assert load_config(env=env, check_shm=False).workers == 3


@pytest.mark.parametrize(("args", "expected"), [
    ([], {}),
    (["workers=4"], {"workers": "4"}),
    (["memory.region.size=64mb", "workers = 4", "workers=5"],
     {"memory.region.size": "64mb", "workers": "5"}),
    (["network.buffer-timeout="], {"network.buffer-timeout": ""}),
])
def test_parse_cli_overrides(args: list[str], expected: dict[str, str]) -> None:
    assert parse_cli_overrides(args) == expected


@pytest.mark.parametrize(("args", "pattern"), [
    (["workers"], r"^-D argument must be key=value \(e\.g\. -D workers=4\); got 'workers'$"),
    (["=4"], r"^-D argument must be key=value"),
    (["memory.segment-size=64kb"], r"got memory\.segment-size \(from cli -D memory\.segment-size="
                                   r"64kb\); did you mean memory\.segment\.size\?"),
])
def test_parse_cli_overrides_rejects(args: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_cli_overrides(args)


@pytest.mark.parametrize("call", [
    lambda: load_config(env={}, overrides={"wrokers": 2}, check_shm=False),
    lambda: cfg_of({"wrokers": 2}),
    lambda: cfg_of().with_overrides({"wrokers": 2}),
])
def test_unknown_key_in_code_and_overrides(call: typing.Callable[[], object]) -> None:
    with pytest.raises(ConfigError, match=r"got wrokers \(from .*\); did you mean workers\?"):
        call()


# --------------------------------------------------------------------------- describe


def test_describe_lists_every_key_value_and_source(tmp_path: Path) -> None:
    path = write(tmp_path, 'memory.region.size = "512mb"\n')
    cfg = load_config(path, env={"SHMFLOW_WORKERS": "4"}, overrides={"network.buffer-timeout": "0"},
                      check_shm=False)
    lines = cfg.describe().splitlines()
    for spec in KEYS:
        [line] = [ln for ln in lines if ln.split()[:1] == [spec.key]]
        assert line.endswith(cfg.source(spec.key)), line
    text = cfg.describe()
    assert re.search(rf"memory\.region\.size\s+512 MiB\s+file {re.escape(str(path))}$", text, re.M)
    assert re.search(r"^workers\s+4\s+env SHMFLOW_WORKERS$", text, re.M)
    assert re.search(r"^network\.buffer-timeout\s+0 s\s+cli -D network\.buffer-timeout=0$", text,
                     re.M)
    assert re.search(r"^memory\.segment\.size\s+32 KiB\s+default$", text, re.M)
    assert "memory plan: 4 worker arena(s) of 128 MiB" in text
    assert "409 buffers x 32 KiB" in text and "(needs >= 48)" in text


# --------------------------------------------------------------------------- managed memory, spill dirs, aliases


def test_managed_size_wins_over_the_fraction_when_set() -> None:
    assert cfg_of().memory_plan().managed_bytes_per_worker == int(0.4 * 128 * MiB) // (4 * KiB) * 4 * KiB
    plan = cfg_of({"memory.managed.size": "64mb", "memory.managed.fraction": 0.1}).memory_plan()
    assert plan.managed_bytes_per_worker == 64 * MiB
    assert cfg_of({"memory.managed.size": "64mb"}).describe().splitlines()[0].startswith("key")
    with pytest.raises(ConfigError, match=r"^network \+ managed memory per worker must fit the worker arena"):
        cfg_of({"memory.managed.size": "1gb"})


def test_io_tmp_dirs_takes_one_or_more_directories() -> None:
    assert cfg_of({"io.tmp-dirs": "/a, /b"}).tmp_dirs == ("/a", "/b")
    assert cfg_of({"io.tmp-dirs": "/a:/b"}).tmp_dirs == ("/a", "/b")
    assert cfg_of({"io.tmp-dirs": ["/c"]}).tmp_dirs == ("/c",)
    with pytest.raises(ConfigError, match=r"^io\.tmp-dirs must be one or more directories, separated by ',' or ':'"):
        cfg_of({"io.tmp-dirs": " , "})


@pytest.mark.parametrize(("alias", "key", "value", "parsed"), [
    ("taskmanager.memory.managed.size", "memory.managed.size", "32mb", 32 * MiB),
    ("taskmanager.memory.managed.fraction", "memory.managed.fraction", "0.3", 0.3),
    ("taskmanager.memory.network.fraction", "memory.network.fraction", "0.2", 0.2),
    ("taskmanager.memory.network.min", "memory.network.min", "16mb", 16 * MiB),
    ("taskmanager.memory.network.max", "memory.network.max", "512mb", 512 * MiB),
    ("taskmanager.memory.segment-size", "memory.segment.size", "64kb", 64 * KiB),
])
def test_flink_names_set_the_same_keys_and_say_so(tmp_path, alias, key, value, parsed) -> None:
    cli = load_config(env={}, overrides=parse_cli_overrides([f"{alias}={value}"]), check_shm=False)
    assert cli[key] == parsed
    assert cli.source(key) == f"cli -D {alias}={value}"
    env_var = "SHMFLOW_" + alias.upper().replace(".", "_").replace("-", "_")
    env = load_config(env={env_var: value}, check_shm=False)
    assert env[key] == parsed and env.source(key) == f"env {env_var} as {alias}"
    toml = tmp_path / "c.toml"
    toml.write_text(f'"{alias}" = "{value}"\n')
    from_file = load_config(toml, env={}, check_shm=False)
    assert from_file[key] == parsed and from_file.source(key) == f"file {toml} as {alias}"
    in_code = ShmflowConfig({alias: value}, source="StreamEnvironment(config=...)", check_shm=False)
    assert in_code.source(key) == f"StreamEnvironment(config=...) as {alias}"


def test_a_config_dict_in_code_is_reported_as_coming_from_stream_environment(plenty_of_shm: None) -> None:
    from runtime.api import StreamEnvironment

    env = StreamEnvironment(workers=2, config={"memory.region.size": "64mb", "network.buffer-timeout": "5ms"})
    cfg = env.config
    assert cfg.source("memory.region.size") == "StreamEnvironment(config=...)"
    assert cfg.source("workers") == "StreamEnvironment(workers=...)"
    assert cfg.source("memory.segment.size") == "default"
    table = cfg.describe()
    assert re.search(r"^memory\.region\.size\s+64 MiB\s+StreamEnvironment\(config=\.\.\.\)$", table, re.M), table
    assert "cli -D" not in table
    with pytest.raises(ConfigError, match=r"^workers must be an integer in \[1, 256\]; got 0 "
                                          r"\(from StreamEnvironment\(config=\.\.\.\)\)$"):
        StreamEnvironment(config={"workers": 0})
    with pytest.raises(ConfigError, match=r"got memory\.region\.sise \(from StreamEnvironment\(config=\.\.\.\)\)"):
        StreamEnvironment(config={"memory.region.sise": "64mb"})


def test_user_input_errors_of_the_api_are_shmflow_errors_and_value_errors() -> None:
    from runtime.api import StreamEnvironment
    from runtime.errors import InvalidArgumentError, ShmflowError

    assert issubclass(InvalidArgumentError, ShmflowError) and issubclass(InvalidArgumentError, ValueError)
    with pytest.raises(InvalidArgumentError, match=r"^mode must be one of \('auto', 'streaming', 'batch'\); "
                                                   r"got 'strem'$"):
        StreamEnvironment(mode="strem")
    env = StreamEnvironment(workers=2)
    with pytest.raises(InvalidArgumentError, match=r"^parallelism of 'map' must be in \[1, 2\] \(workers\); got 3$"):
        env.from_collection([1]).map(abs).set_parallelism(3)
    with pytest.raises(InvalidArgumentError, match=r"^GeneratorSource rate must be > 0 records/s or None; got -1$"):
        env.from_generator(abs, rate=-1)
    with pytest.raises(InvalidArgumentError, match=r"^window size must be > 0 seconds and finite; got 0$"):
        from runtime.api import TumblingEventTimeWindows
        TumblingEventTimeWindows.of(0)


def test_a_formatted_size_in_pib_parses_back() -> None:
    assert parse_size(format_size(1024 << 40)) == parse_size("1 PiB") == 1 << 50


def test_the_young_generation_threshold_is_bounded_and_names_its_key() -> None:
    assert cfg_of({"python.gc.young-threshold": "5000"}).gc_young_threshold == 5000
    with pytest.raises(ConfigError, match=r"python\.gc\.young-threshold.*\[700, 10000000\].*got 10"):
        cfg_of({"python.gc.young-threshold": 10})


def test_checkpoint_and_restart_keys_take_flink_spellings_and_name_the_key_when_wrong() -> None:
    cfg = cfg_of({"execution.checkpointing.interval": "200ms", "execution.checkpointing.mode": "AT_LEAST_ONCE",
                  "restart-strategy.type": "fixeddelay", "restart-strategy.fixed-delay.attempts": "3"})
    assert cfg.checkpoint_interval == 0.2 and cfg.checkpoint_mode == "at-least-once"
    assert cfg.restart_strategy == "fixed-delay" and cfg.fixed_delay_attempts == 3
    assert cfg_of({"restart-strategy.type": "off"}).restart_strategy == "none"
    with pytest.raises(ConfigError, match=r"restart-strategy\.type must be one of .*got sometimes"):
        cfg_of({"restart-strategy.type": "sometimes"})
    with pytest.raises(ConfigError, match=r"execution\.checkpointing\.mode must be one of .*got twice"):
        cfg_of({"execution.checkpointing.mode": "twice"})
    with pytest.raises(ConfigError, match=r"initial-backoff must be a duration in \[0, .*max-backoff \(60 s\)\]"):
        cfg_of({"restart-strategy.exponential-delay.initial-backoff": "2min"})
    with pytest.raises(ConfigError, match=r"jitter-factor must be a number in \[0, 1\]; got 2"):
        cfg_of({"restart-strategy.exponential-delay.jitter-factor": 2})


def test_the_checkpoint_area_is_sized_by_its_key_and_adds_to_the_region():
    managed = {"memory.region.size": "256mb", "memory.managed.size": "40mb"}
    off = cfg_of(managed).memory_plan()
    assert off.checkpoint_bytes_per_worker == 0 and off.shm_bytes == 256 << 20  # auto, checkpointing off
    auto = cfg_of({**managed, "execution.checkpointing.interval": "1s"}).memory_plan()
    assert auto.checkpoint_bytes_per_worker == 128 << 20  # 3 x 40 MiB, rounded up to a power of two
    assert auto.shm_bytes == (256 << 20) + auto.workers * (128 << 20)
    assert "checkpoint area     128 MiB per worker" in auto.describe()
    given_size = cfg_of({**managed, "state.checkpoints.shared-memory.size": "20mb"}).memory_plan()
    assert given_size.checkpoint_bytes_per_worker == 32 << 20
    none = cfg_of({**managed, "execution.checkpointing.interval": "1s",
                   "state.checkpoints.shared-memory.size": 0}).memory_plan()
    assert none.checkpoint_bytes_per_worker == 0
    spec = next(k for k in KEYS if k.key == "state.checkpoints.shared-memory.size")
    assert spec.show(cfg_of()["state.checkpoints.shared-memory.size"]) == "auto" and spec.show(1 << 20) == "1 MiB"
    with pytest.raises(ConfigError, match=r"state.checkpoints.shared-memory.size must be 'auto' or a size >= 0"):
        cfg_of({"state.checkpoints.shared-memory.size": "lots"})

"""Typed configuration of a shmflow cluster: defaults < TOML file < SHMFLOW_* env < CLI flags.

Role: one immutable ``ShmflowConfig`` holding every key (Flink naming), where each value came
from, and the derived per-worker ``MemoryPlan``. Every bad value or combination raises
``ConfigError`` here, before any region is created or any process forked. Parsing and
validation are driven by one table, ``KEYS``.

Imports: runtime.errors only (stdlib otherwise).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from runtime.errors import ConfigError
from runtime.memory.units import format_bytes, free_bytes
from runtime.network.budget import min_buffers_per_worker

ENV_PREFIX = "SHMFLOW_"
#: SHMFLOW_ variables that are not config keys (and so never "unknown"); SHMFLOW_UI*: `shmflow run --ui`'s flags.
ENV_NON_CONFIG = frozenset({"SHMFLOW_SHM_PREFIX", "SHMFLOW_CONFIG", "SHMFLOW_UI", "SHMFLOW_UI_LINGER"})
ENV_NON_CONFIG_PREFIXES = ("SHMFLOW_TEST_", "SHMFLOW_INTERNAL_")
SHM_DIR = "/dev/shm"
#: Extra /dev/shm space required on top of memory.region.size (header, rounding).
SHM_ALLOWANCE = 0.01
#: ``state.checkpoints.shared-memory.size = auto``, parsed.
AUTO_SIZE = -1
#: auto: the checkpoint area holds this many times a worker's managed memory (the last complete checkpoint's
#: snapshots and those of the one in progress, with room for state spilled beyond managed memory).
CHECKPOINT_AREA_FACTOR = 3

# --------------------------------------------------------------------------- value parsers


class _RuleBroken(Exception):
    """Internal: a value breaks a rule; ``rule`` completes "<subject> <rule>; got <value>"."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


_SIZE_UNITS = {unit: 1 << shift for shift, units in (
    (0, ("", "b", "byte", "bytes")), (10, ("k", "kb", "kib")), (20, ("m", "mb", "mib")),
    (30, ("g", "gb", "gib")), (40, ("t", "tb", "tib")), (50, ("p", "pb", "pib"))) for unit in units}
_DURATION_UNITS = {unit: Decimal(factor) for factor, units in (
    ("1", ("", "s", "sec", "secs", "second", "seconds")), ("0.001", ("ms", "milli", "millis")),
    ("0.000001", ("us", "µs")), ("60", ("m", "min", "mins", "minute", "minutes")),
    ("3600", ("h", "hour", "hours"))) for unit in units}
_NUMBER_UNIT = re.compile(r"^\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-zµ]*)\s*$", re.IGNORECASE)
_SIZE_RULE = "must be a byte count or a size such as 64mb, 64 MiB, 1 GiB, 512k (k = 1024)"
_DURATION_RULE = "must be a duration such as 100ms, 1 s, 0, or a number of seconds"
_NEGATIVE_RULE = "must be >= 0 (negative values are invalid)"
_WHOLE_BYTES_RULE = "must be a whole number of bytes"
_INTEGER_RULE = "must be an integer"
_NUMBER_RULE = "must be a finite number"
_STRING_RULE = "must be a string"
_PATHS_RULE = "must be one or more directories, separated by ',' or ':'"


def _amount(value: object, units: Mapping[str, int | Decimal], rule: str) -> Decimal:
    """A non-negative number with an optional unit (``"64 MiB"``, ``"100ms"``, ``4096``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        amount = Decimal(value)
    elif isinstance(value, str) and (match := _NUMBER_UNIT.match(value)) \
            and match.group(2).lower() in units:
        amount = Decimal(match.group(1)) * units[match.group(2).lower()]
    else:
        raise _RuleBroken(rule)
    if amount < 0:
        raise _RuleBroken(_NEGATIVE_RULE)
    return amount


def _size(value: object) -> int:
    """Parse a size in bytes; binary units (kb = kib = k = 1024)."""
    amount = _amount(value, _SIZE_UNITS, _SIZE_RULE)
    if amount != amount.to_integral_value():
        raise _RuleBroken(_WHOLE_BYTES_RULE)
    return int(amount)


def _size_or_auto(value: object) -> int:
    """A size in bytes, or ``"auto"`` (-1, which ``as_dict`` gives back)."""
    if (isinstance(value, str) and value.strip().lower() == "auto") or (type(value) is int and value == AUTO_SIZE):
        return AUTO_SIZE
    return _size(value)


def _duration(value: object) -> float:
    """Parse a duration into float seconds; bare numbers are seconds."""
    return float(_amount(value, _DURATION_UNITS, _DURATION_RULE))


def _integer(value: object) -> int:
    """An int, or a string of one (from env or CLI); never a bool or a float."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    raise _RuleBroken(_INTEGER_RULE)


def _number(value: object) -> float:
    """A finite float from an int, a float or a string; never a bool."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
    except ValueError:
        raise _RuleBroken(_NUMBER_RULE) from None
    if not math.isfinite(number):
        raise _RuleBroken(_NUMBER_RULE)
    return number


def _choice(value: object) -> str:
    """A case-insensitive string; the key's ``ok`` checks membership."""
    if not isinstance(value, str):
        raise _RuleBroken(_STRING_RULE)
    return value.strip().lower()


#: restart-strategy.type's values; Flink's other spellings map to them (_strategy).
RESTART_STRATEGIES = ("none", "fixed-delay", "failure-rate", "exponential-delay")
_STRATEGY_ALIASES = {"off": "none", "disable": "none", "fixeddelay": "fixed-delay", "failurerate": "failure-rate",
                     "exponentialdelay": "exponential-delay"}


def _mode(value: object) -> str:
    """A checkpointing mode: Flink's EXACTLY_ONCE / AT_LEAST_ONCE or exactly-once / at-least-once."""
    return _choice(value).replace("_", "-")


def _strategy(value: object) -> str:
    """A restart strategy's name, Flink's spellings accepted (off, fixeddelay, ...); "" is unset."""
    name = _choice(value)
    return _STRATEGY_ALIASES.get(name, name)


def _path(value: object) -> str:
    """One path (may be empty: the key's default applies)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _RuleBroken(_STRING_RULE)
    return os.path.expanduser(value.strip()) if value.strip() else ""


def _paths(value: object) -> tuple[str, ...]:
    """Directories separated by commas or the OS path separator (Flink's ``io.tmp-dirs``); never empty."""
    if isinstance(value, (list, tuple)):
        parts = [str(p).strip() for p in value]
    elif isinstance(value, str):
        parts = [p.strip() for p in re.split(rf"[,{re.escape(os.pathsep)}]", value)]
    else:
        raise _RuleBroken(_PATHS_RULE)
    parts = [p for p in parts if p]
    if not parts:
        raise _RuleBroken(_PATHS_RULE)
    return tuple(parts)


def _show(value: object) -> str:
    """Render a raw value for a message: plain strings bare (got 3000), everything else repr."""
    if isinstance(value, str) and value and value.strip() == value:
        return value
    return repr(value)


def parse_size(value: object) -> int:
    """Parse a size (``4096``, ``"64mb"``, ``"1 GiB"``, ``"512k"``, ``"32 KiB"``) into bytes.

    Units are binary: k, kb and kib all mean 1024.

    Raises:
        ConfigError: negative, a fraction of a byte, a boolean, or unparsable.
    """
    try:
        return _size(value)
    except _RuleBroken as exc:
        msg = f"size {exc.rule}; got {_show(value)}"
        raise ConfigError(msg) from None


def parse_duration(value: object) -> float:
    """Parse a duration (``"100ms"``, ``"1 s"``, ``"0"``, ``0.5``) into float seconds.

    Raises:
        ConfigError: negative, not finite, a boolean, or unparsable.
    """
    try:
        return _duration(value)
    except _RuleBroken as exc:
        msg = f"duration {exc.rule}; got {_show(value)}"
        raise ConfigError(msg) from None


#: Byte sizes in messages: the project's one formatter (runtime.memory.units).
format_size = format_bytes


def format_duration(seconds: float) -> str:
    """Human-readable duration: ``0.1 -> "100 ms"``, ``1.5 -> "1.5 s"``, ``0 -> "0 s"``."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g} ms"
    return f"{seconds:g} s"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------- the key table


@dataclass(frozen=True)
class KeySpec:
    """One configuration key.

    ``rule`` completes "<key> <rule>; got <value>" and may name other keys' values as
    ``{attr}`` (formatted for humans); ``ok`` checks a parsed value on its own. Checks that
    involve two keys live in ``_PAIRS`` and ``ShmflowConfig._check_combinations``.
    """

    key: str
    attr: str
    parse: Callable[[object], Any]
    default: object
    rule: str
    ok: Callable[[Any], bool]
    doc: str
    # how shown: "size" | "size-or-unset" | "size-or-auto" | "duration" | "fraction" | "int" | "choice" | "path"
    # | "paths"
    kind: str

    def show(self, value: Any) -> str:
        """A parsed value for humans: sizes as "32 KiB", durations as "100 ms"."""
        if self.kind == "size":
            return format_size(value)
        if self.kind == "duration":
            return format_duration(value)
        if self.kind == "paths":
            return ",".join(value)
        if self.kind == "size-or-unset":
            return format_size(value) if value else "unset"
        if self.kind == "size-or-auto":
            return "auto" if value == AUTO_SIZE else format_size(value)
        return f"{value:g}" if self.kind == "fraction" else str(value)

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + re.sub(r"[.\-]", "_", self.key.upper())


KEYS: tuple[KeySpec, ...] = (
    KeySpec("memory.region.size", "region_size", _size, "256mb",
            "must be a size > 0", lambda v: v > 0,
            "usable bytes of the one shared-memory region (all worker arenas)", "size"),
    KeySpec("memory.min-block", "min_block", _size, "4kb",
            "must be a power of two in [256 B, memory.segment.size ({segment_size})]",
            lambda v: _is_pow2(v) and v >= 256,
            "smallest block of the buddy allocator", "size"),
    KeySpec("memory.segment.size", "segment_size", _size, "32kb",
            "must be a power of two >= memory.min-block ({min_block})",
            lambda v: _is_pow2(v) and v >= 256,
            "size of one network buffer", "size"),
    KeySpec("memory.network.fraction", "network_fraction", _number, 0.1,
            "must be a number in [0, 1]", lambda v: 0 <= v <= 1,
            "share of each worker arena for network buffers", "fraction"),
    KeySpec("memory.network.min", "network_min", _size, "8mb",
            "must be a size <= memory.network.max ({network_max})", lambda v: True,
            "lower bound of network memory per worker", "size"),
    KeySpec("memory.network.max", "network_max", _size, "1gb",
            "must be a size >= memory.network.min ({network_min})", lambda v: True,
            "upper bound of network memory per worker", "size"),
    KeySpec("memory.managed.fraction", "managed_fraction", _number, 0.4,
            "must be a number in [0, 1]", lambda v: 0 <= v <= 1,
            "share of each worker arena for managed memory (sort, hash, window state)", "fraction"),
    KeySpec("memory.managed.size", "managed_size", _size, 0,
            "must be a size >= 0 (0: use memory.managed.fraction)", lambda v: v >= 0,
            "managed memory per worker, absolute; wins over memory.managed.fraction when set", "size-or-unset"),
    KeySpec("io.tmp-dirs", "tmp_dirs", _paths, tempfile.gettempdir(),
            "must be one or more directories, separated by ',' or ':'", lambda v: bool(v),
            "where operators spill what does not fit their managed memory (one directory per job and "
            "worker, removed when the job ends)", "paths"),
    KeySpec("network.buffers-per-channel", "buffers_per_channel", _integer, 8,
            "must be an integer >= 1", lambda v: v >= 1,
            "exclusive buffers per input channel (credits)", "int"),
    KeySpec("network.floating-buffers-per-gate", "floating_buffers_per_gate", _integer, 16,
            "must be an integer >= 0", lambda v: v >= 0,
            "shared buffers per input gate for bursts", "int"),
    KeySpec("network.buffer-timeout", "buffer_timeout", _duration, "100ms",
            "must be a duration >= 0 (e.g. 100ms, 1 s, 0)", lambda v: v >= 0,
            "flush a partly filled buffer after this long; 0 flushes every record", "duration"),
    KeySpec("network.max-record-size", "max_record_size", _size, "64mb",
            "must be a size in [1 KiB, 4 GiB)", lambda v: 1024 <= v < 1 << 32,
            "largest frame a worker writes or accepts: one record batch, columnar batch or event", "size"),
    KeySpec("network.transport", "transport", _choice, "auto",
            "must be one of 'auto', 'shm', 'tcp'", lambda v: v in ("auto", "shm", "tcp"),
            "data plane: shm (handles), tcp (bytes) or auto (shm on one host)", "choice"),
    KeySpec("rest.address", "rest_address", _path, "127.0.0.1",
            "must be a host name or address to listen on", lambda v: bool(v),
            "where the coordinator serves the dashboard, the REST API and /metrics (Flink's key; loopback only "
            "by default: the pages show job names and memory to whoever can connect)", "path"),
    KeySpec("rest.port", "rest_port", _integer, 8081,
            "must be an integer in [0, 65535] (0: any free port)", lambda v: 0 <= v <= 65535,
            "port of the dashboard, the REST API and /metrics (Flink's key and default)", "int"),
    KeySpec("metrics.reporter.prom.port", "prom_port", _integer, 0,
            "must be an integer in [0, 65535] (0: /metrics on rest.port only)", lambda v: 0 <= v <= 65535,
            "a second port serving only /metrics, for scrape configs written for Flink's PrometheusReporter "
            "(Flink's key; its usual value is 9249)", "int"),
    KeySpec("cluster.max-message-size", "max_message_size", _size, "256mb",
            "must be a size >= 1 MiB", lambda v: v >= 1 << 20,
            "largest control message a process accepts (ZMQ_MAXMSGSIZE): a job graph with its collections; "
            "a peer sending more is disconnected", "size"),
    KeySpec("state.backend", "state_backend", _choice, "heap",
            "must be one of 'heap', 'managed'", lambda v: v in ("heap", "managed"),
            "where keyed state of streaming operators lives: heap (Python objects; fastest, unbounded) or managed "
            "(serialized in managed memory, spilled to io.tmp-dirs when full)", "choice"),
    KeySpec("pipeline.max-parallelism", "max_parallelism", _integer, 128,
            "must be an integer in [1, 32768]", lambda v: 1 <= v <= 32768,
            "key groups that keyed state is divided into (the most subtasks state can be rescaled to)", "int"),
    KeySpec("python.gc.young-threshold", "gc_young_threshold", _integer, 100_000,
            "must be an integer in [700, 10000000]", lambda v: 700 <= v <= 10_000_000,
            "net allocations of GC-tracked objects that start a collection of the youngest generation in a "
            "worker running a job (gc.set_threshold's first value; Python's default, 700, makes a worker that "
            "holds batches of thousands of records walk them again and again)", "int"),
    KeySpec("execution.checkpointing.interval", "checkpoint_interval", _duration, 0,
            "must be a duration >= 0 (0: checkpointing off)", lambda v: v >= 0,
            "take a checkpoint this often (Flink's key); 0 turns checkpointing off", "duration"),
    KeySpec("execution.checkpointing.mode", "checkpoint_mode", _mode, "exactly-once",
            "must be one of 'exactly-once', 'at-least-once'", lambda v: v in ("exactly-once", "at-least-once"),
            "exactly-once aligns barriers at operators with several inputs; at-least-once does not", "choice"),
    KeySpec("execution.checkpointing.timeout", "checkpoint_timeout", _duration, "10min",
            "must be a duration > 0", lambda v: v > 0,
            "a checkpoint not complete after this long is aborted", "duration"),
    KeySpec("state.checkpoints.dir", "checkpoints_dir", _path, "",
            "must be a directory path (empty: the user's data directory)", lambda v: True,
            "where checkpoints are written, one directory per job (empty: $XDG_DATA_HOME/shmflow/checkpoints, "
            "or ~/.local/share/shmflow/checkpoints)", "path"),
    KeySpec("execution.savepoint.path", "savepoint_path", _path, "",
            "must be a checkpoint directory or its _metadata file (empty: start afresh)", lambda v: True,
            "start the job from this checkpoint (Flink's key; `shmflow run --from-checkpoint PATH`)", "path"),
    KeySpec("state.checkpoints.shared-memory.size", "checkpoint_memory_size", _size_or_auto, "auto",
            "must be 'auto' or a size >= 0 (0: off)", lambda v: v >= AUTO_SIZE,
            "per worker: a block of the shared region that keeps the latest checkpoint's snapshots, so that a "
            "restarted job reads them there instead of from their files; auto: with checkpointing on, twice "
            "the managed memory, rounded up to a power of two; 0: off", "size-or-auto"),
    KeySpec("state.checkpoints.num-retained", "checkpoints_retained", _integer, 1,
            "must be an integer >= 1", lambda v: v >= 1,
            "completed checkpoints kept per job", "int"),
    KeySpec("restart-strategy.type", "restart_strategy", _strategy, "",
            "must be one of 'none', 'fixed-delay', 'failure-rate', 'exponential-delay' (or unset)",
            lambda v: v in ("", *RESTART_STRATEGIES),
            "what happens when a job fails: none, fixed-delay, failure-rate or exponential-delay (unset: "
            "exponential-delay with checkpointing on, none without, as Flink)", "choice"),
    KeySpec("restart-strategy.fixed-delay.attempts", "fixed_delay_attempts", _integer, 1,
            "must be an integer >= 0", lambda v: v >= 0,
            "fixed-delay: restarts before the job fails", "int"),
    KeySpec("restart-strategy.fixed-delay.delay", "fixed_delay_delay", _duration, "1s",
            "must be a duration >= 0", lambda v: v >= 0,
            "fixed-delay: wait between a failure and the restart", "duration"),
    KeySpec("restart-strategy.failure-rate.max-failures-per-interval", "failure_rate_max_failures", _integer, 1,
            "must be an integer >= 1", lambda v: v >= 1,
            "failure-rate: failures within one interval before the job fails", "int"),
    KeySpec("restart-strategy.failure-rate.failure-rate-interval", "failure_rate_interval", _duration, "1min",
            "must be a duration > 0", lambda v: v > 0,
            "failure-rate: the interval failures are counted in", "duration"),
    KeySpec("restart-strategy.failure-rate.delay", "failure_rate_delay", _duration, "1s",
            "must be a duration >= 0", lambda v: v >= 0,
            "failure-rate: wait between a failure and the restart", "duration"),
    KeySpec("restart-strategy.exponential-delay.initial-backoff", "exponential_initial_backoff", _duration, "1s",
            "must be a duration in [0, restart-strategy.exponential-delay.max-backoff ({exponential_max_backoff})]",
            lambda v: v >= 0,
            "exponential-delay: wait after the first failure", "duration"),
    KeySpec("restart-strategy.exponential-delay.max-backoff", "exponential_max_backoff", _duration, "1min",
            "must be a duration >= restart-strategy.exponential-delay.initial-backoff ({exponential_initial_backoff})",
            lambda v: v >= 0,
            "exponential-delay: the longest wait", "duration"),
    KeySpec("restart-strategy.exponential-delay.backoff-multiplier", "exponential_multiplier", _number, 1.5,
            "must be a number >= 1", lambda v: v >= 1,
            "exponential-delay: the wait grows by this factor with every failure", "fraction"),
    KeySpec("restart-strategy.exponential-delay.reset-backoff-threshold", "exponential_reset_threshold", _duration,
            "1h", "must be a duration > 0", lambda v: v > 0,
            "exponential-delay: a job running this long without failure starts again at the initial backoff",
            "duration"),
    KeySpec("restart-strategy.exponential-delay.jitter-factor", "exponential_jitter", _number, 0.1,
            "must be a number in [0, 1]", lambda v: 0 <= v <= 1,
            "exponential-delay: random share of the backoff added or subtracted", "fraction"),
    KeySpec("restart-strategy.exponential-delay.attempts-before-reset-backoff", "exponential_attempts", _integer,
            2**31 - 1, "must be an integer >= 1", lambda v: v >= 1,
            "exponential-delay: restarts before the job fails, counted since the backoff was last reset "
            "(default: unlimited)", "int"),
    KeySpec("workers", "workers", _integer, 2,
            "must be an integer in [1, 256]", lambda v: 1 <= v <= 256,
            "number of worker processes", "int"),
)
#: Flink's names for the same settings (``taskmanager.memory.*``), accepted wherever a key is.
ALIASES = {
    "taskmanager.memory.managed.size": "memory.managed.size",
    "taskmanager.memory.managed.fraction": "memory.managed.fraction",
    "taskmanager.memory.network.fraction": "memory.network.fraction",
    "taskmanager.memory.network.min": "memory.network.min",
    "taskmanager.memory.network.max": "memory.network.max",
    "taskmanager.memory.segment-size": "memory.segment.size",
}
_BY_KEY = {spec.key: spec for spec in KEYS}
_BY_ATTR = {spec.attr: spec for spec in KEYS}
_BY_ENV = {spec.env_var: spec for spec in KEYS}
_ALIAS_BY_ENV = {ENV_PREFIX + re.sub(r"[.\-]", "_", alias.upper()): alias for alias in ALIASES}
#: (lower, upper): lower must be <= upper. The key the user set is blamed (upper if both or none).
_PAIRS = (("memory.min-block", "memory.segment.size"), ("memory.network.min", "memory.network.max"),
          ("restart-strategy.exponential-delay.initial-backoff", "restart-strategy.exponential-delay.max-backoff"))


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown(name: str, origin: str, choices: Iterable[str]) -> ConfigError:
    choices = list(choices)
    msg = (f"config key must be a known key; got {name} (from {origin})"
           f"{_did_you_mean(name, choices)} (known keys: {', '.join(choices)})")
    return ConfigError(msg)


def _spec(name: str, origin: str, *, aliases: bool = False) -> KeySpec:
    """The spec of a dotted key (or, with ``aliases``, a snake_case attribute name)."""
    spec = _BY_KEY.get(ALIASES.get(name, name)) or (_BY_ATTR.get(name) if aliases else None)
    if spec is None:
        raise _unknown(name, origin, [*_BY_KEY, *ALIASES])
    return spec


def _as(name: str, origin: str) -> str:
    """The origin of a value set through a Flink alias says so: ``file x.toml as taskmanager.memory...``."""
    return f"{origin} as {name}" if name in ALIASES else origin


def _origin(source: str) -> str:
    return "default" if source == "default" else f"from {source}"


# --------------------------------------------------------------------------- memory plan


@dataclass(frozen=True)
class MemoryPlan:
    """How each worker's arena of the shared region is carved (derived, not configured)."""

    workers: int
    region_size: int
    arena_bytes: int  # per worker: largest power of two <= region_size // workers
    segment_size: int
    min_block: int
    network_bytes_per_worker: int  # a multiple of segment_size
    network_buffers_per_worker: int
    required_buffers_per_worker: int  # buffers-per-channel * workers + floating-buffers-per-gate
    managed_bytes_per_worker: int  # a multiple of min_block
    #: Per worker slot, outside its arena: the checkpoint area (a power of two; 0: none).
    checkpoint_bytes_per_worker: int = 0

    @property
    def shm_bytes(self) -> int:
        """The bytes the region is created with: ``memory.region.size`` and the checkpoint areas."""
        return self.region_size + self.workers * self.checkpoint_bytes_per_worker

    @property
    def unused_bytes_per_worker(self) -> int:
        return self.arena_bytes - self.network_bytes_per_worker - self.managed_bytes_per_worker

    def describe(self) -> str:
        """A few lines for ``shmflow config``."""
        w = self.workers
        return "\n".join([
            f"memory plan: {w} worker arena(s) of {format_size(self.arena_bytes)} "
            f"= {format_size(w * self.arena_bytes)} of {format_size(self.region_size)} region",
            f"  network per worker  {self.network_buffers_per_worker} buffers x "
            f"{format_size(self.segment_size)} = {format_size(self.network_bytes_per_worker)} "
            f"(needs >= {self.required_buffers_per_worker})",
            f"  managed per worker  {format_size(self.managed_bytes_per_worker)} "
            f"in blocks of >= {format_size(self.min_block)}",
            f"  unused per worker   {format_size(self.unused_bytes_per_worker)}",
            f"  checkpoint area     {format_size(self.checkpoint_bytes_per_worker)} per worker, "
            f"outside the arenas" if self.checkpoint_bytes_per_worker else "  checkpoint area     none",
        ])


def _shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Free bytes of the shm filesystem, or None where there is none (e.g. macOS)."""
    return free_bytes(path)


# --------------------------------------------------------------------------- the config


class ShmflowConfig:
    """The immutable, validated configuration: dotted access (``cfg["workers"]``) and attributes.

    Construct with ``ShmflowConfig()`` (defaults), ``ShmflowConfig.from_mapping(...)``, or
    ``load_config(...)``. Construction validates every key, every combination and the memory
    plan, and (unless ``check_shm=False``) that the region fits the free space of /dev/shm.
    """

    __slots__ = ("_check_shm", "_raw", "_values")
    _raw: Mapping[str, tuple[object, str]]  # key -> (value as given, source label)
    _values: Mapping[str, Any]  # key -> parsed value
    _check_shm: bool  # inherited by replace() / with_overrides()

    # Typed attribute access, served by __getattr__ from the table (a test keeps these in sync).
    region_size: int
    min_block: int
    segment_size: int
    network_fraction: float
    network_min: int
    network_max: int
    managed_fraction: float
    managed_size: int
    tmp_dirs: tuple[str, ...]
    buffers_per_channel: int
    floating_buffers_per_gate: int
    buffer_timeout: float
    max_record_size: int
    transport: str
    rest_address: str
    rest_port: int
    prom_port: int
    max_message_size: int
    state_backend: str
    max_parallelism: int
    gc_young_threshold: int
    checkpoint_interval: float
    checkpoint_mode: str
    checkpoint_timeout: float
    checkpoints_dir: str
    savepoint_path: str
    checkpoints_retained: int
    checkpoint_memory_size: int
    restart_strategy: str
    fixed_delay_attempts: int
    fixed_delay_delay: float
    failure_rate_max_failures: int
    failure_rate_interval: float
    failure_rate_delay: float
    exponential_initial_backoff: float
    exponential_max_backoff: float
    exponential_multiplier: float
    exponential_reset_threshold: float
    exponential_jitter: float
    exponential_attempts: int
    workers: int

    def __init__(self, values: Mapping[str, object] | None = None, *, source: str = "code",
                 check_shm: bool = True) -> None:
        raw = {spec.key: (spec.default, "default") for spec in KEYS}
        for name, value in (values or {}).items():
            raw[_spec(name, source, aliases=True).key] = (value, _as(name, source))
        self._init(raw, check_shm)

    def _init(self, raw: dict[str, tuple[object, str]], check_shm: bool) -> None:
        object.__setattr__(self, "_raw", MappingProxyType(raw))
        object.__setattr__(self, "_check_shm", check_shm)
        object.__setattr__(self, "_values", MappingProxyType(self._parse_all()))
        self._check_combinations()
        plan = self.memory_plan()
        if check_shm:
            self._check_shm_space(plan)

    @classmethod
    def _from_raw(cls, raw: dict[str, tuple[object, str]], *, check_shm: bool) -> ShmflowConfig:
        cfg = cls.__new__(cls)
        cfg._init(raw, check_shm)
        return cfg

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, source: str = "code",
                     check_shm: bool = True) -> ShmflowConfig:
        """Defaults overlaid with ``values`` (dotted keys or attribute names) from ``source``."""
        return cls(values, source=source, check_shm=check_shm)

    # ---- validation

    def _fail(self, key: str, rule: str) -> str:
        value, source = self._raw[key]
        return f"{key} {rule}; got {_show(value)} ({_origin(source)})"

    def _rule(self, spec: KeySpec, values: Mapping[str, Any]) -> str:
        return spec.rule.format_map({s.attr: s.show(values[s.key]) for s in KEYS})

    def _parse_all(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        errors = []
        for spec in KEYS:
            try:
                values[spec.key] = spec.parse(self._raw[spec.key][0])
            except _RuleBroken as exc:  # sizes/durations explain their format; others their range
                rule = exc.rule if spec.kind in ("size", "duration") else spec.rule
                errors.append(self._fail(spec.key, rule))
        for spec in KEYS:
            if spec.key in values and not spec.ok(values[spec.key]):
                known = {s.key: values.get(s.key, s.parse(s.default)) for s in KEYS}
                rule = self._rule(spec, known)
                errors.append(self._fail(spec.key, rule))
        if errors:
            msg = errors[0] if len(errors) == 1 else (
                f"{len(errors)} config values are invalid:\n  " + "\n  ".join(errors))
            raise ConfigError(msg)
        return values

    def _check_combinations(self) -> None:
        v = self._values
        for lower, upper in _PAIRS:
            if v[lower] > v[upper]:
                lower_set = self.source(lower) != "default"
                blamed = lower if lower_set and self.source(upper) == "default" else upper
                raise ConfigError(self._fail(blamed, self._rule(_BY_KEY[blamed], v)))
        net, managed = "memory.network.fraction", "memory.managed.fraction"
        if v[net] + v[managed] > 1:
            msg = (f"{net} + {managed} must be <= 1 (they share each worker arena); got "
                   f"{v[net]:g} ({_origin(self.source(net))}) + {v[managed]:g} "
                   f"({_origin(self.source(managed))}) = {v[net] + v[managed]:g}")
            raise ConfigError(msg)

    def _where(self, *keys: str) -> str:
        """Keys, values and origins: ``workers=4 (from env SHMFLOW_WORKERS), ...``."""
        return ", ".join(f"{k}={_BY_KEY[k].show(self[k])} ({_origin(self.source(k))})"
                         for k in keys)

    def memory_plan(self) -> MemoryPlan:
        """Carve the region into per-worker arenas; raise ConfigError if a worker cannot run.

        Raises:
            ConfigError: an arena below memory.min-block, too few network buffers for one input
                gate reading every worker, or network + managed memory larger than the arena.
        """
        v = self._values
        workers, region, seg, block = (v["workers"], v["memory.region.size"],
                                       v["memory.segment.size"], v["memory.min-block"])
        share = region // workers
        arena = 1 << (share.bit_length() - 1) if share else 0
        if arena < block:
            msg = (f"memory.region.size / workers must give each worker an arena >= "
                   f"memory.min-block ({format_size(block)}); got {format_size(arena)} per worker "
                   f"from {self._where('memory.region.size', 'workers')}; "
                   f"raise memory.region.size or lower workers")
            raise ConfigError(msg)
        network = int(v["memory.network.fraction"] * arena)
        network = max(v["memory.network.min"], min(network, v["memory.network.max"]))
        network = min(network, arena) // seg * seg
        buffers = network // seg
        required = min_buffers_per_worker(workers, buffers_per_channel=v["network.buffers-per-channel"],
                                          floating_per_gate=v["network.floating-buffers-per-gate"])
        managed_size = v["memory.managed.size"]
        managed = (managed_size if managed_size else int(v["memory.managed.fraction"] * arena)) // block * block
        if buffers < required:
            inputs = self._where("memory.region.size", "workers", "memory.network.fraction",
                                 "memory.network.min")
            msg = (f"network buffers per worker must be >= network.buffers-per-channel x workers + "
                   f"network.floating-buffers-per-gate = {required}; got {buffers} buffers of "
                   f"{format_size(seg)} in a {format_size(arena)} arena from "
                   f"{inputs}; "
                   f"raise memory.region.size, memory.network.fraction or memory.network.min")
            raise ConfigError(msg)
        if network + managed > arena:
            msg = (f"network + managed memory per worker must fit the worker arena "
                   f"({format_size(arena)}); got {format_size(network)} + {format_size(managed)} "
                   f"from {self._where('memory.network.min', 'memory.managed.fraction')}; "
                   "lower memory.managed.fraction or memory.network.min, "
                   "or raise memory.region.size")
            raise ConfigError(msg)
        checkpoint_area = v["state.checkpoints.shared-memory.size"]
        if checkpoint_area == AUTO_SIZE:
            checkpoint_area = CHECKPOINT_AREA_FACTOR * managed if v["execution.checkpointing.interval"] > 0 else 0
        if checkpoint_area:  # one buddy block per worker slot
            checkpoint_area = max(block, 1 << (checkpoint_area - 1).bit_length())
        return MemoryPlan(workers=workers, region_size=region, arena_bytes=arena, segment_size=seg,
                          min_block=block, network_bytes_per_worker=network,
                          network_buffers_per_worker=buffers, required_buffers_per_worker=required,
                          managed_bytes_per_worker=managed, checkpoint_bytes_per_worker=checkpoint_area)

    def _check_shm_space(self, plan: MemoryPlan) -> None:
        free = _shm_free_bytes()
        if free is None:
            return
        needed = plan.shm_bytes + math.ceil(plan.shm_bytes * SHM_ALLOWANCE)
        if needed > free:
            areas = (f" and {plan.workers} checkpoint areas of {format_size(plan.checkpoint_bytes_per_worker)} "
                     f"(state.checkpoints.shared-memory.size)" if plan.checkpoint_bytes_per_worker else "")
            msg = (f"memory.region.size{areas} (plus {SHM_ALLOWANCE:.0%} allowance) must fit the free "
                   f"space of {SHM_DIR}, {format_size(free)} ({free} bytes); got "
                   f"{format_size(plan.shm_bytes)} "
                   f"({_origin(self.source('memory.region.size'))}); "
                   f"containers often give {SHM_DIR} only 64 MB: raise its size "
                   f"(e.g. docker run --shm-size=1g) or lower memory.region.size"
                   f"{' or state.checkpoints.shared-memory.size' if areas else ''}")
            raise ConfigError(msg)

    # ---- access

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            msg = f"{key!r} is not a config key{_did_you_mean(key, _BY_KEY)}"
            raise KeyError(msg)
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a dotted key, or ``default`` if there is no such key."""
        return self._values.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __getattr__(self, attr: str) -> Any:
        spec = _BY_ATTR.get(attr)
        if spec is None or attr.startswith("_"):
            msg = f"{type(self).__name__!r} object has no attribute {attr!r}"
            raise AttributeError(msg)
        return self._values[spec.key]

    def __setattr__(self, name: str, value: object) -> None:
        msg = f"ShmflowConfig is immutable; use replace() or with_overrides() to set {name}"
        raise dataclasses.FrozenInstanceError(msg)

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    def source(self, key: str) -> str:
        """Where a key's value came from: "default", "file PATH", "env NAME", "cli -D k=v", ..."""
        self[key]  # raises KeyError, with a suggestion, for an unknown key
        return self._raw[key][1]

    def as_dict(self) -> dict[str, Any]:
        """Plain parsed values by dotted key (ints, floats, strs): msgpack-able for workers.

        A worker rebuilds with ``ShmflowConfig.from_mapping(d, source=..., check_shm=False)``
        (the region already occupies /dev/shm by then).
        """
        return dict(self._values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShmflowConfig):
            return NotImplemented
        return self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if self.source(k) != "default"}
        return f"ShmflowConfig({changed!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The unpickling side (a worker) skips the /dev/shm check: the region may exist by then.
        return (_rebuild, (dict(self._raw),))

    # ---- derivation

    def with_overrides(self, values: Mapping[str, object], *,
                       source: str = "code") -> ShmflowConfig:
        """A new validated config: this one with ``values`` (keys or attr names) from ``source``."""
        raw = dict(self._raw)
        for name, value in values.items():
            raw[_spec(name, source, aliases=True).key] = (value, _as(name, source))
        return ShmflowConfig._from_raw(raw, check_shm=self._check_shm)

    def replace(self, **values: object) -> ShmflowConfig:
        """``cfg.replace(workers=4)`` or ``cfg.replace(**{"memory.region.size": "64mb"})``."""
        return self.with_overrides(values, source="code")

    def describe(self) -> str:
        """What ``shmflow config`` prints: every key, its value and origin, then the memory plan."""
        rows = [(spec.key, spec.show(self[spec.key]), self.source(spec.key))
                for spec in KEYS]
        kw = max(len(r[0]) for r in rows)
        vw = max(len(r[1]) for r in rows)
        lines = [f"{'key':<{kw}}  {'value':<{vw}}  source"]
        lines += [f"{k:<{kw}}  {val:<{vw}}  {src}" for k, val, src in rows]
        return "\n".join(lines) + "\n\n" + self.memory_plan().describe()


def _rebuild(raw: dict[str, tuple[object, str]]) -> ShmflowConfig:
    return ShmflowConfig._from_raw(raw, check_shm=False)


# --------------------------------------------------------------------------- sources


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _flatten(value, key + ".")
        else:
            yield key, value


def _read_toml(path: Path) -> dict[str, tuple[object, str]]:
    origin = f"file {path}"
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        msg = f"config file must be readable; got {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from exc
    except tomllib.TOMLDecodeError as exc:
        msg = f"config file must be valid TOML; got {path}: {exc}"
        raise ConfigError(msg) from exc
    values: dict[str, tuple[object, str]] = {}
    for name, value in _flatten(document):
        key = _spec(name, origin).key
        if key in values:
            msg = f"config key must be set once per file; got {key} twice ({origin})"
            raise ConfigError(msg)
        values[key] = (value, _as(name, origin))
    return values


def _read_env(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Config values from SHMFLOW_* variables: key -> (value, var name). Empty means unset."""
    found = {}
    for var, value in sorted(env.items()):
        if (not var.startswith(ENV_PREFIX) or var in ENV_NON_CONFIG
                or var.startswith(ENV_NON_CONFIG_PREFIXES) or value == ""):
            continue
        alias = _ALIAS_BY_ENV.get(var)
        spec = _BY_ENV.get(var) or (_BY_KEY[ALIASES[alias]] if alias else None)
        if spec is None:
            msg = (f"environment variable {var} must name a config key "
                   f"(SHMFLOW_ + key with . and - as _){_did_you_mean(var, _BY_ENV)}")
            raise ConfigError(msg)
        found[spec.key] = (value, var if alias is None else f"{var} as {alias}")
    return found


def parse_cli_overrides(args: Iterable[str]) -> dict[str, str]:
    """Turn ``-D key=value`` arguments into ``{key: value}`` (later wins); keys are checked.

    Raises:
        ConfigError: an argument without ``=``, or an unknown key (with a suggestion).
    """
    overrides = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            msg = f"-D argument must be key=value (e.g. -D workers=4); got {arg!r}"
            raise ConfigError(msg)
        _spec(key, f"cli -D {arg}")
        overrides[key] = value.strip()  # as given: a Flink alias is named as the value's origin
    return overrides


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None, *,
                check_shm: bool = True, labelled: Mapping[str, tuple[object, str]] | None = None) -> ShmflowConfig:
    """Build the config from defaults < TOML file < SHMFLOW_* env < CLI overrides.

    ``path`` defaults to ``$SHMFLOW_CONFIG`` (if set); ``env`` defaults to ``os.environ``;
    ``overrides`` are ``-D`` values (see ``parse_cli_overrides``), reported as ``cli -D key=value``;
    ``labelled`` maps keys to ``(value, where it came from)`` (``StreamEnvironment(config=...)``) and wins.

    Raises:
        ConfigError: an unreadable file, an unknown key anywhere, or any invalid value or
            combination, naming the key, the value, the valid range and where it came from.
    """
    env = os.environ if env is None else env
    if path is None and env.get("SHMFLOW_CONFIG"):
        path = env["SHMFLOW_CONFIG"]
    raw = {spec.key: (spec.default, "default") for spec in KEYS}
    if path is not None:
        file = Path(path)
        raw.update(_read_toml(file))
    raw.update((k, (v, f"env {var}")) for k, (v, var) in _read_env(env).items())
    for name, value in (overrides or {}).items():
        key = _spec(name, f"cli -D {name}={value}").key
        raw[key] = (value, f"cli -D {name}={value}")
    for name, (value, source) in (labelled or {}).items():
        raw[_spec(name, source).key] = (value, _as(name, source))
    return ShmflowConfig._from_raw(raw, check_shm=check_shm)


__all__ = ["ALIASES", "KEYS", "KeySpec", "MemoryPlan", "ShmflowConfig", "format_duration", "format_size",
           "load_config", "parse_cli_overrides", "parse_duration", "parse_size"]

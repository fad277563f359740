"""Event-time windows over an out-of-order stream of sensor readings.

    python examples/windowed_sensors.py              # 200,000 readings from 50 sensors
    python examples/windowed_sensors.py 20000        # fewer readings
    python examples/windowed_sensors.py 60000 0.5    # watermarks trail by 0.5 s: some readings come too late
    shmflow run examples/windowed_sensors.py --workers 3

Each of 50 sensors reports a temperature about once per second. A reading is a
tuple ``(sensor, event_time, temperature)``; readings arrive out of order, each
up to ``MAX_DELAY`` (3 s) after its event time. ``with_timestamps`` makes
watermarks that trail the largest event time seen by ``out_of_orderness``
(default ``MAX_DELAY``, so no reading is late), and two keyed event-time
windows run over the same stream:

- tumbling 10 s windows: readings, mean and maximum temperature per sensor
  (a ``reduce`` over ``(sensor, count, sum, max)``);
- sliding 30 s windows every 10 s: the maximum temperature per sensor (``max(2)``).

Prints the first tumbling windows of one sensor, the hottest sliding windows,
how many readings came too late (dropped by the windows, counted in the job's
metrics) and a summary of the run.
"""

from __future__ import annotations

import sys

import numpy as np

from runtime import StreamEnvironment
from runtime.api import SlidingEventTimeWindows, TumblingEventTimeWindows

SENSORS = 50
MAX_DELAY = 3.0  # seconds a reading may arrive after its event time
TUMBLING = 10.0
SLIDING = (30.0, 10.0)  # size, slide


def generate(n: int = 200_000, seed: int = 42, *, sensors: int = SENSORS,
             max_delay: float = MAX_DELAY) -> list[tuple[str, float, float]]:
    """``n`` readings ``(sensor, event_time, temperature)`` in arrival order (deterministic for a seed).

    Reading ``i`` comes from sensor ``s{i % sensors:02d}`` at event time
    ``i // sensors`` seconds plus a random fraction (millisecond resolution).
    Temperatures (degrees C, 2 decimals) follow a per-sensor base, a slow
    cycle and noise. Each reading is delayed by a random ``[0, max_delay)``
    seconds and the list is ordered by arrival, so a reading arrives less than
    ``max_delay`` seconds of event time behind any reading before it.
    """
    rng = np.random.default_rng(seed)
    index = np.arange(n)
    sensor = index % sensors
    event_time = np.round(index // sensors + rng.random(n), 3)
    base = rng.uniform(15.0, 25.0, size=sensors)[sensor]
    temperature = np.round(base + 5.0 * np.sin(event_time / 600.0) + rng.normal(0.0, 1.0, size=n), 2)
    arrival = np.argsort(event_time + rng.random(n) * max_delay, kind="stable")
    names = np.array([f"s{i:02d}" for i in range(sensors)])
    return list(zip(names[sensor[arrival]].tolist(), event_time[arrival].tolist(),
                    temperature[arrival].tolist()))


# ----------------------------------------------------------------------------- record functions
def event_time(reading: tuple) -> float:
    return reading[1]


def sensor_of(record: tuple) -> str:
    return record[0]


def to_stats(reading: tuple) -> tuple[str, int, float, float]:
    """``(sensor, count, sum, max)`` of one reading: the tumbling window's reduce input."""
    return reading[0], 1, reading[2], reading[2]


def merge_stats(a: tuple, b: tuple) -> tuple[str, int, float, float]:
    return a[0], a[1] + b[1], a[2] + b[2], max(a[3], b[3])


def stats_row(result: tuple) -> tuple[str, float, float, int, float, float]:
    """``(sensor, start, end, count, mean, max)`` from a window result ``(key, (sensor, n, sum, max), start, end)``."""
    sensor, (_, count, total, hottest), start, end = result
    return sensor, start, end, count, total / count, hottest


def max_row(result: tuple) -> tuple[str, float, float, float]:
    """``(sensor, start, end, max)`` from a window result ``(key, reading with the max temperature, start, end)``."""
    sensor, reading, start, end = result
    return sensor, start, end, reading[2]


# ---------------------------------------------------------------------------------------- job
def build(env: StreamEnvironment, readings: list, out_of_orderness: float = MAX_DELAY):
    """The job; returns the collect handles ``(tumbling, sliding)``.

    ``tumbling`` holds ``(sensor, start, end, count, mean, max)`` per sensor and 10 s window,
    ``sliding`` holds ``(sensor, start, end, max)`` per sensor and 30 s window (every 10 s).
    """
    stream = env.from_collection(readings).with_timestamps(event_time, out_of_orderness=out_of_orderness)
    tumbling = (stream.map(to_stats)
                      .key_by(sensor_of)
                      .window(TumblingEventTimeWindows.of(TUMBLING))
                      .reduce(merge_stats)
                      .map(stats_row)
                      .collect())
    sliding = (stream.key_by(sensor_of)
                     .window(SlidingEventTimeWindows.of(*SLIDING))
                     .max(2)
                     .map(max_row)
                     .collect())
    return tumbling, sliding


def late_records(result) -> int:
    """Readings the windows dropped as late, over every operator of the job."""
    return sum(int(ops.get("late_records_dropped", 0)) for ops in result.metrics.get("operators", {}).values())


def main(argv: list[str] | None = None) -> None:
    argv = [] if argv is None else argv
    n = int(argv[0]) if argv else 200_000
    out_of_orderness = float(argv[1]) if len(argv) > 1 else MAX_DELAY
    readings = generate(n)
    env = StreamEnvironment()
    tumbling, sliding = build(env, readings, out_of_orderness)
    result = env.execute("windowed-sensors")

    windows = sorted(tumbling.values())
    first = windows[0][0] if windows else None
    print(f"tumbling {TUMBLING:g} s windows: {len(windows):,} (sensor x window); first windows of sensor {first}:")
    for sensor, start, end, count, mean, hottest in [w for w in windows if w[0] == first][:5]:
        print(f"  {sensor} [{start:7.1f}, {end:7.1f})  {count:3d} readings  mean {mean:6.2f} C  max {hottest:6.2f} C")
    size, slide = SLIDING
    hottest = sorted(sliding.values(), key=lambda w: (-w[3], w[0], w[1]))[:5]
    print(f"sliding {size:g} s windows every {slide:g} s: {len(sliding):,} (sensor x window); hottest:")
    for sensor, start, end, top in hottest:
        print(f"  {sensor} [{start:7.1f}, {end:7.1f})  max {top:6.2f} C")
    print(f"late records dropped: {late_records(result):,} (out-of-orderness {out_of_orderness:g} s, "
          f"readings delayed up to {MAX_DELAY:g} s)")
    print(result.summary())


if __name__ == "__main__":
    main(sys.argv[1:])

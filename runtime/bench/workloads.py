"""The standard workloads W1, W2, W3, W4 of ``shmflow bench``: input generators, consumer work, checks, result records.

Imports: numpy and the standard library only (no other part of shmflow).

This is the project's own implementation of ``../shared/WORKLOADS.md``. It is
written independently of the executable reference (``workloads_reference.py``)
but consumes the random generators in exactly the same sequence, so it produces
the same bytes: the W1 pool and checksums, the W2 columns and sums, and the W3
corpus (sha256 :data:`W3_SHA256`) are identical to the reference's.
``tests/test_bench_workloads.py`` proves this whenever the reference is at hand.

W1 "buffer transfer"  one producer hands fixed-size slices of a 64 MiB pool to
                      one consumer, which sums every uint64 word.
W2 "keyed records"    N (key, value) records flow to a consumer keeping
                      per-key sums over 100,000 keys.
W3 "word count"       a 50 MB Zipf-distributed corpus is counted by word,
                      hash-partitioned over 2 worker processes.
W4 "large keyed state" a keyed sum of 10 M records over 5 M keys, generated in
                      chunks by whoever consumes them, with 64 MiB of managed
                      memory per worker: checked by three checksums.

Everything here is deterministic and process-independent except W3's
partitioning, which relies on ``hash(str)`` and therefore on
``PYTHONHASHSEED=0`` in every worker.
"""

from __future__ import annotations

import collections
import hashlib
import math
import operator
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The benchmark clock: CLOCK_MONOTONIC on Linux, comparable across processes of one machine.
clock = time.monotonic

MASK64 = (1 << 64) - 1
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# ------------------------------------------------------------------------------------------------ W1
W1_SEED = 1
W1_POOL_BYTES = 64 * MiB
W1_TOTAL_BYTES = 4 * GiB
W1_QUICK_BYTES = 256 * MiB
W1_BUFFER_SIZES = (32 * KiB, 1 * MiB)
W1_WINDOW = 64               # in-flight bound: Queue maxsize, zmq HWM
W1_RING_BYTES = 8 * MiB      # the hand-rolled shm ring: 256 x 32 KiB or 8 x 1 MiB


def w1_pool() -> np.ndarray:
    """The 64 MiB source pool: 8 Mi uint64 words from ``PCG64(1)``, uniform over [0, 2**64)."""
    gen = np.random.Generator(np.random.PCG64(W1_SEED))
    return gen.integers(0, 2 ** 64, size=W1_POOL_BYTES // 8, dtype=np.uint64, endpoint=False)


def w1_check_size(buf_bytes: int) -> None:
    """Raise ValueError unless ``buf_bytes`` is a whole number of words that tiles the pool exactly."""
    if buf_bytes <= 0 or buf_bytes % 8 or W1_POOL_BYTES % buf_bytes:
        raise ValueError(f"W1 buffer size must be a multiple of 8 dividing {W1_POOL_BYTES} bytes; got {buf_bytes}")


def w1_nbufs(buf_bytes: int, total_bytes: int = W1_TOTAL_BYTES) -> int:
    """How many buffers of ``buf_bytes`` make ``total_bytes`` (rounded down)."""
    w1_check_size(buf_bytes)
    return total_bytes // buf_bytes


def w1_slice(pool: np.ndarray, i: int, buf_bytes: int) -> np.ndarray:
    """Buffer ``i``: the pool's bytes from ``(i * B) mod 64 MiB``, ``B`` long, as a uint64 view (no copy).

    The pool is a whole number of buffers, so a buffer never wraps around its end.
    """
    words = buf_bytes // 8
    start = (i % (W1_POOL_BYTES // buf_bytes)) * words
    return pool[start:start + words]


def w1_expected_checksum(pool: np.ndarray, buf_bytes: int, nbufs: int) -> int:
    """The consumer's correct result: the sum mod 2**64 of every word of buffers ``0 .. nbufs-1``.

    Buffers walk the pool in order and start over, so the sum is some whole
    passes over the pool plus a prefix of it.
    """
    per_pass = W1_POOL_BYTES // buf_bytes
    passes, left = divmod(nbufs, per_pass)
    whole = int(pool.sum(dtype=np.uint64))
    prefix = int(pool[:left * (buf_bytes // 8)].sum(dtype=np.uint64))
    return (passes * whole + prefix) & MASK64


def w1_touch(buf: Any) -> int:
    """The consumer's work on one buffer: read every byte as uint64 words and sum them (mod 2**64).

    ``buf`` is anything exposing the buffer protocol (bytes, memoryview, a zmq
    frame's buffer, an ndarray). Callers accumulate with ``(acc + t) & MASK64``.
    """
    return int(np.frombuffer(buf, dtype=np.uint64).sum(dtype=np.uint64))


# ------------------------------------------------------------------------------------------------ W2
W2_SEED = 20240601
W2_KEYS = 100_000
W2_N = 5_000_000
W2_QUICK_N = 500_000
W2_BATCH = 1_000


def w2_columns(n: int = W2_N) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` records as two columns: int64 keys in [0, 100000) and float64 values in [0, 1).

    Keys are drawn first, then values, from one ``PCG64(20240601)`` generator; so
    ``w2_columns(n)`` is not a prefix of ``w2_columns(m)`` for ``m > n``.
    """
    gen = np.random.Generator(np.random.PCG64(W2_SEED))
    keys = gen.integers(0, W2_KEYS, size=n, dtype=np.int64)
    values = gen.random(n, dtype=np.float64)
    return keys, values


def w2_rows(n: int = W2_N) -> list[tuple[int, float]]:
    """The same records in row form: a list of ``(int, float)`` tuples."""
    keys, values = w2_columns(n)
    return list(zip(keys.tolist(), values.tolist()))


def w2_expected(n: int = W2_N) -> np.ndarray:
    """The correct per-key sums for ``n`` records: float64[100000]."""
    keys, values = w2_columns(n)
    return np.bincount(keys, weights=values, minlength=W2_KEYS)


def w2_row_consume(acc: list[Any], batch: Iterable[Sequence[Any]]) -> None:
    """Row-mode consumer work: add each record's value to ``acc[key]`` in a Python loop."""
    for key, value in batch:
        acc[key] += value


def w2_columnar_consume(acc: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
    """Columnar consumer work: unbuffered ``acc[keys] += values`` (repeated keys all count)."""
    np.add.at(acc, keys, values)


def w2_check(sums: Any, n: int, count: int, expected: np.ndarray | None = None) -> tuple[bool, float]:
    """Check a consumer's result; returns ``(ok, largest absolute error)``.

    ``sums`` is a sequence of 100,000 per-key sums or a mapping key -> sum;
    ``count`` is how many records the consumer saw. OK means every record was
    counted and the sums match ``np.bincount`` within rtol = atol = 1e-9.
    Pass ``expected`` (from :func:`w2_expected`) to skip regenerating it.
    """
    ref = w2_expected(n) if expected is None else expected
    if isinstance(sums, Mapping):
        dense = np.zeros(W2_KEYS, dtype=np.float64)
        for key, value in sums.items():
            dense[int(key)] = value
        sums = dense
    got = np.asarray(sums, dtype=np.float64)
    if got.shape != ref.shape:
        return False, float("inf")
    maxerr = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    ok = count == n and bool(np.allclose(got, ref, rtol=1e-9, atol=1e-9))
    return ok, maxerr


# ------------------------------------------------------------------------------------------------ W3
W3_SEED = 7
W3_VOCAB = 50_000
W3_ZIPF_S = 1.0
W3_LINES = 566_000
W3_WORDS_PER_LINE = (5, 15)  # inclusive
W3_UPPER_FRACTION = 0.01
W3_WORKERS = 2
W3_BATCH = 1_000
W3_QUICK_FRACTION = 10       # quick runs count the first 1/10 of the corpus lines
W3_SHA256 = "55e1c75080756e6700c407bc28412c517383b0814e99daca962601d3b1fbd0e7"
W3_BYTES = 49_997_507
W3_WORDS = 5_658_712
_VOCAB_DRAW = 20_000         # candidate words drawn per round while building the vocabulary


def _w3_vocabulary(gen: np.random.Generator) -> list[str]:
    """50,000 distinct lowercase words, in the order first drawn (that order is the Zipf rank).

    Each round draws 20,000 lengths in [2, 12], then all their letters at once;
    duplicates are skipped and the rest of the round is dropped once the
    vocabulary is full.
    """
    ranked: dict[str, None] = {}
    while len(ranked) < W3_VOCAB:
        lengths = gen.integers(2, 13, size=_VOCAB_DRAW)
        letters = gen.integers(0, 26, size=int(lengths.sum()))
        text = (letters.astype(np.uint8) + ord("a")).tobytes().decode("ascii")
        ends = np.cumsum(lengths).tolist()
        starts = [0, *ends[:-1]]
        ranked.update(dict.fromkeys(text[a:b] for a, b in zip(starts, ends)))
    return list(ranked)[:W3_VOCAB]


def w3_generate(lines: int = W3_LINES) -> str:
    """The W3 corpus with ``lines`` lines, as one str (each line ends in ``\\n``).

    Per line 5..15 words, drawn with probability proportional to 1/rank; about
    1% of all words are UPPER-cased, and the first word of a line is
    Capitalised unless it is upper-case already. Vectorised: every occurrence
    becomes an index into a table of NUL-padded (word, casing, separator)
    tokens; the gathered tokens minus the padding are the text.

    ``lines`` changes every draw after the vocabulary, so a shorter corpus is
    not a prefix of a longer one (quick runs cut the full corpus instead).
    """
    gen = np.random.Generator(np.random.PCG64(W3_SEED))
    vocab = _w3_vocabulary(gen)
    ranks = np.arange(1, W3_VOCAB + 1, dtype=np.float64)
    weights = 1.0 / ranks ** W3_ZIPF_S
    weights /= weights.sum()
    lo, hi = W3_WORDS_PER_LINE
    per_line = gen.integers(lo, hi + 1, size=lines)
    word_ids = gen.choice(W3_VOCAB, size=int(per_line.sum()), p=weights)
    upper = gen.random(word_ids.size) < W3_UPPER_FRACTION
    if lines == 0:
        return "\n"  # what joining zero lines and appending a newline gives
    # Token table: index (word * 3 + casing) * 2 + is_last_of_line.
    line_end = np.cumsum(per_line) - 1
    casing = upper.astype(np.int64)                 # 0 lower, 1 UPPER, 2 Capitalised
    first = line_end - per_line + 1
    casing[first] = np.where(upper[first], 1, 2)
    is_last = np.zeros(word_ids.size, dtype=np.int64)
    is_last[line_end] = 1
    token_ids = (word_ids * 3 + casing) * 2 + is_last
    # Every token as 16 bytes, NUL-padded: [word, casing, separator] -> up to 12 letters + separator.
    lengths = np.fromiter(map(len, vocab), dtype=np.int64, count=W3_VOCAB)
    letters = np.arange(12) < lengths[:, None]
    lower = np.zeros((W3_VOCAB, 12), dtype=np.uint8)
    lower[letters] = np.frombuffer("".join(vocab).encode("ascii"), dtype=np.uint8)
    table = np.zeros((W3_VOCAB, 3, 2, 16), dtype=np.uint8)
    table[:, 0, :, :12] = lower[:, None, :]
    table[:, 1, :, :12] = np.where(letters, lower - 32, 0)[:, None, :]  # ASCII a-z -> A-Z
    table[:, 2, :, :12] = lower[:, None, :]
    table[:, 2, :, 0] -= 32
    words = np.arange(W3_VOCAB)
    table[words, :, 0, lengths] = ord(" ")
    table[words, :, 1, lengths] = ord("\n")
    tokens = table.reshape(-1).view("V16")
    # Gather the tokens in order and drop the padding: the text has no NUL of its own.
    return np.take(tokens, token_ids).tobytes().translate(None, b"\0").decode("ascii")


def data_dir() -> Path:
    """Where generated inputs are cached: ``$BENCH_DATA_DIR`` or ``/tmp/bench-data`` (created)."""
    path = Path(os.environ.get("BENCH_DATA_DIR", "/tmp/bench-data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) whose sha256 matched in this process


def w3_corpus_path() -> Path:
    """The full corpus file, generated once into :func:`data_dir` and verified by sha256.

    The file name is the reference's, so the two share one cache. A cached file
    whose digest is wrong (truncated, edited) is regenerated; a freshly
    generated one whose digest is wrong raises, since then this numpy draws
    different numbers than the one the workload was defined with.

    Raises:
        RuntimeError: the generated corpus does not have sha256 :data:`W3_SHA256`.
    """
    path = data_dir() / f"w3_corpus_s{W3_SEED}_v{W3_VOCAB}_l{W3_LINES}.txt"
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if st is not None:
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            return path
        if st.st_size == W3_BYTES and sha256_file(path) == W3_SHA256:
            _VERIFIED.add(key)
            return path
    data = w3_generate().encode("ascii")
    digest = hashlib.sha256(data).hexdigest()
    if digest != W3_SHA256:
        msg = (f"generated W3 corpus has sha256 {digest}, expected {W3_SHA256} "
               f"(numpy {np.__version__} draws differently from the version the workload was defined with)")
        raise RuntimeError(msg)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    st = path.stat()
    _VERIFIED.add((str(path), st.st_size, st.st_mtime_ns))
    return path


def w3_corpus_text(quick: bool = False) -> str:
    """The full corpus as str, or with ``quick`` its first 1/10 of lines (56,600 lines)."""
    text = w3_corpus_path().read_text(encoding="ascii")
    if quick:
        text = w3_head_lines(text, W3_LINES // W3_QUICK_FRACTION)
    return text


def w3_head_lines(text: str, lines: int) -> str:
    """The first ``lines`` lines of ``text`` (each with its newline)."""
    end = -1
    for _ in range(lines):
        end = text.find("\n", end + 1)
        if end < 0:
            return text
    return text[:end + 1]


def w3_tokens(text: str) -> list[str]:
    """W3 tokenising: lower-case, split on whitespace (the same for a line or many)."""
    return text.lower().split()


def w3_reference(text: str) -> collections.Counter[str]:
    """The correct result: ``Counter(text.lower().split())``."""
    return collections.Counter(w3_tokens(text))


def w3_line_ranges(text: str, parts: int = W3_WORKERS) -> list[tuple[int, int]]:
    """Cut ``text`` into ``parts`` contiguous ``(start, end)`` index ranges, each ending after a newline.

    Cut ``i`` is the first line end at or after ``len(text) * i // parts``; the
    ranges cover the text exactly (the last range may be empty for tiny texts).
    """
    n = len(text)
    cuts = [0]
    for i in range(1, parts):
        newline = text.find("\n", n * i // parts)
        cuts.append(n if newline < 0 else newline + 1)
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


def w3_owner(word: str, parts: int = W3_WORKERS) -> int:
    """The worker that counts ``word``: ``hash(word) % parts`` (needs PYTHONHASHSEED=0 everywhere)."""
    return hash(word) % parts


def w3_merge(parts: Iterable[Mapping[str, int]]) -> tuple[dict[str, int], bool]:
    """Union of the workers' counts, and whether they were disjoint (each word owned by one worker)."""
    merged: dict[str, int] = {}
    disjoint = True
    for counts in parts:
        for word, count in counts.items():
            if word in merged:
                disjoint = False
                merged[word] += count
            else:
                merged[word] = count
    return merged, disjoint


def w3_check(counts: Mapping[str, int], ref: Mapping[str, int]) -> bool:
    """True if ``counts`` has exactly the words of ``ref`` with exactly its counts."""
    return len(counts) == len(ref) and all(ref.get(word) == count for word, count in counts.items())


# ------------------------------------------------------------------------------------------------ W4
W4_N = 10_000_000            # records
W4_K = 5_000_000             # distinct keys: every key occurs N // K = 2 times
W4_STRIDE = 7919             # a prime coprime with K: i -> (i * 7919) % K is a bijection on each block of K
W4_CHUNK = 65_536            # records per generated chunk
W4_QUICK_N = 1_000_000
W4_QUICK_K = 500_000
W4_BOUND_K = 10_000          # the memory bound's job: the same N over this few keys
W4_MANAGED_BYTES = 64 * MiB  # managed memory per worker
W4_RSS_SLACK = 96 * MiB      # the bound's allowance on top of the small-state peak and managed memory


def w4_scale(quick: bool = False) -> tuple[int, int]:
    """(N, K) of a full run, or of a ``--quick`` one (a tenth of both)."""
    return (W4_QUICK_N, W4_QUICK_K) if quick else (W4_N, W4_K)


def w4_key_index(start: int, stop: int, k: int = W4_K) -> np.ndarray:
    """Key indices of records ``[start, stop)``: ``(i * 7919) % k`` as int64."""
    return np.arange(start, stop, dtype=np.int64) * W4_STRIDE % k


def w4_columns(start: int, stop: int, k: int = W4_K) -> dict[str, np.ndarray]:
    """Records ``[start, stop)`` as columns: int64 ``key`` (the key index) and int64 ``value`` (all 1)."""
    keys = w4_key_index(start, stop, k)
    return {"key": keys, "value": np.ones(keys.size, dtype=np.int64)}


def w4_key_str(idx: int) -> str:
    """The row form's key of key index ``idx``: ``"key-%012d"``."""
    return f"key-{idx:012d}"


def w4_rows(start: int, stop: int, k: int = W4_K) -> list[tuple[str, int]]:
    """Records ``[start, stop)`` as ``("key-%012d", 1)`` tuples."""
    return [(f"key-{idx:012d}", 1) for idx in w4_key_index(start, stop, k).tolist()]


def w4_chunks(n: int = W4_N, chunk: int = W4_CHUNK) -> list[tuple[int, int]]:
    """The ``(start, stop)`` ranges in which the ``n`` records are generated, in order."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def w4_expected(n: int = W4_N, k: int = W4_K) -> dict[str, int]:
    """The three checksums of a correct keyed sum over the ``n`` records (see :func:`w4_checksum`).

    groups: distinct keys; total: the sum of every per-key sum (= n);
    weighted: the sum over keys of ``key_index * 3 + sum``, mod 2**64.
    Closed form: records ``[0, n)`` cover the bijection ``i -> i * 7919 % k``
    ``n // k`` whole times and then ``n % k`` more records, so every key
    present has ``n // k`` or ``n // k + 1`` records (checked by
    ``tests/test_bench_workloads.py`` against a bincount).
    """
    if math.gcd(W4_STRIDE, k) != 1:  # not a bijection: count the keys
        per = np.bincount(w4_key_index(0, n, k), minlength=k)
        present = np.flatnonzero(per)
        key_sum, groups = int(present.sum(dtype=np.int64)), int(present.size)
    else:
        full, rest = divmod(n, k)
        groups = k if full else rest
        # every key index 0..k-1 occurs `full` times; records full*k.. add one each to `rest` distinct keys
        key_sum = k * (k - 1) // 2 if full else int(w4_key_index(0, rest, k).sum(dtype=np.int64))
    return {"groups": groups, "total": n, "weighted": (3 * key_sum + n) & MASK64}


def w4_checksum(pairs: Iterable[tuple[Any, int]]) -> dict[str, int]:
    """Checksums of ``(key, sum)`` results; ``key`` is an int key index or a ``"key-%012d"`` string."""
    groups = total = weighted = 0
    for key, value in pairs:
        idx = key if isinstance(key, int) else int(key[4:])
        groups += 1
        total += value
        weighted = (weighted + idx * 3 + value) & MASK64
    return {"groups": groups, "total": total, "weighted": weighted}


def w4_checksum_rows(pairs: list[tuple[Any, int]]) -> dict[str, int]:
    """:func:`w4_checksum` of ``("key-%012d", sum)`` results, vectorised; anything else goes to :func:`w4_checksum`."""
    keys = list(map(_first, pairs))
    try:
        raw = np.array(keys, dtype="S") if keys and set(map(type, keys)) == {str} else None
        values = np.fromiter(map(_second, pairs), np.int64, len(pairs))
    except (UnicodeEncodeError, OverflowError, TypeError, ValueError):
        raw = None
    if raw is None or raw.dtype.itemsize != 16 or any(len(k) != 16 for k in (keys[0], keys[-1])):
        return w4_checksum(pairs)
    b = raw.view(np.uint8).reshape(len(raw), 16)
    digits = b[:, 4:].astype(np.int64) - ord("0")
    if not ((b[:, :4] == np.frombuffer(b"key-", np.uint8)).all() and ((digits >= 0) & (digits <= 9)).all()
            and (b[:, 4:] != 0).all()):
        return w4_checksum(pairs)
    idx = digits @ (10 ** np.arange(11, -1, -1, dtype=np.int64))
    return w4_checksum_columns(idx, values)


def w5_checksum_updates(updates: list[tuple[Any, int]]) -> dict[str, int]:
    """W5's checksums of the *last* update per key, from every update of a streaming count.

    A count's updates of one key are 1, 2, ..., n_k, so the last updates' checksums telescope: groups is
    the number of updates equal to 1, total the number of updates, and weighted the sum of
    ``key_index * 3`` over the first updates plus the number of updates (each adds 1 to its key's count).
    Several batches' checksums add up with :func:`w4_add_checksums`.
    """
    counts = np.fromiter(map(_second, updates), np.int64, len(updates))
    firsts = [updates[i] for i in np.flatnonzero(counts == 1).tolist()]
    c = w4_checksum_rows([(key, 0) for key, _ in firsts])
    return {"groups": c["groups"], "total": len(updates), "weighted": (c["weighted"] + len(updates)) & MASK64}


def w4_checksum_columns(keys: np.ndarray, values: np.ndarray) -> dict[str, int]:
    """:func:`w4_checksum` of columnar results (int key indices and sums), vectorised."""
    keys64 = np.asarray(keys).astype(np.uint64, copy=False)
    values64 = np.asarray(values).astype(np.uint64, copy=False)
    weighted = int((keys64 * np.uint64(3) + values64).sum(dtype=np.uint64))
    return {"groups": int(keys64.size), "total": int(np.asarray(values).sum(dtype=np.int64)), "weighted": weighted}


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


def w4_add_checksums(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Checksums of the union of disjoint result sets: counts add, ``weighted`` adds mod 2**64."""
    groups = total = weighted = 0
    for part in parts:
        groups += part["groups"]
        total += part["total"]
        weighted = (weighted + part["weighted"]) & MASK64
    return {"groups": groups, "total": total, "weighted": weighted}


def w4_dict_baseline(n: int = W4_N, k: int = W4_K) -> dict[str, Any]:
    """One process, unbounded memory: generate the row chunks and fold them into a ``dict``, timed as a whole.

    Returns the reference's record: peer, variant, n, k, seconds, records_per_s, ok.
    """
    t0 = clock()
    acc: dict[str, int] = {}
    get = acc.get
    for start, stop in w4_chunks(n):
        for key, value in w4_rows(start, stop, k):
            acc[key] = get(key, 0) + value
    elapsed = clock() - t0
    ok = w4_checksum(acc.items()) == w4_expected(n, k)
    return {"peer": "python dict", "variant": "one process, rows generated in chunks", "n": n, "k": k,
            "seconds": round(elapsed, 6), "records_per_s": round(n / elapsed, 1), "ok": ok}


# ------------------------------------------------------------------------------------------------ records
def environment() -> dict[str, Any]:
    """Versions and machine facts to store beside results."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
    }
    for module in ("zmq", "msgpack"):
        mod = sys.modules.get(module)
        if mod is not None:
            env[module] = getattr(mod, "__version__", None) or ".".join(map(str, getattr(mod, "version", ())))
    return env


def record(workload: str, peer: str, variant: str, params: Mapping[str, Any], seconds: float,
           items: int, unit: str, ok: bool, **extra: Any) -> dict[str, Any]:
    """One result: ``rate`` is ``items / seconds`` in ``unit`` (bytes are reported in GB/s, 1e9 B/s).

    ``extra`` keys (a secondary rate, an error text, notes) are added as they are.
    """
    rate = items / seconds if seconds > 0 else float("inf")
    if unit == "GB/s":
        rate /= 1e9
    out: dict[str, Any] = {
        "workload": workload,
        "peer": peer,
        "variant": variant,
        "params": dict(params),
        "seconds": round(seconds, 6),
        "rate": round(rate, 4 if unit == "GB/s" else 1),
        "unit": unit,
        "ok": bool(ok),
    }
    out.update(extra)
    return out


def w1_record(peer: str, variant: str, buf_bytes: int, nbufs: int, seconds: float, ok: bool,
              **extra: Any) -> dict[str, Any]:
    """A W1 result: GB/s over ``buf_bytes * nbufs`` bytes, plus buffers/s."""
    total = buf_bytes * nbufs
    params = {"buf_bytes": buf_bytes, "nbufs": nbufs, "total_bytes": total, **extra.pop("params", {})}
    return record("W1", peer, variant, params, seconds, total, "GB/s", ok,
                  buffers_per_s=round(nbufs / seconds, 1) if seconds > 0 else None, **extra)


def w2_record(peer: str, variant: str, n: int, seconds: float, ok: bool, max_abs_err: float,
              **extra: Any) -> dict[str, Any]:
    """A W2 result: records/s for ``n`` records, with the largest error of the per-key sums."""
    params = {"n": n, **extra.pop("params", {})}
    return record("W2", peer, variant, params, seconds, n, "records/s", ok, max_abs_err=max_abs_err, **extra)


def w4_record(peer: str, variant: str, n: int, seconds: float, ok: bool, **extra: Any) -> dict[str, Any]:
    """A W4 result: records/s for ``n`` records folded into per-key sums."""
    params = {"n": n, **extra.pop("params", {})}
    return record("W4", peer, variant, params, seconds, n, "records/s", ok, **extra)


def w3_record(peer: str, variant: str, words: int, seconds: float, ok: bool, **extra: Any) -> dict[str, Any]:
    """A W3 result: words/s for ``words`` words counted."""
    params = {"words": words, **extra.pop("params", {})}
    return record("W3", peer, variant, params, seconds, words, "words/s", ok, **extra)


__all__ = [
    "GiB", "KiB", "MASK64", "MiB", "W1_BUFFER_SIZES", "W1_POOL_BYTES", "W1_QUICK_BYTES", "W1_RING_BYTES",
    "W1_TOTAL_BYTES", "W1_WINDOW", "W2_BATCH", "W2_KEYS", "W2_N", "W2_QUICK_N", "W3_BATCH", "W3_LINES",
    "W3_SHA256", "W3_WORDS", "W3_WORKERS", "clock", "data_dir", "environment", "record", "sha256_file",
    "w1_check_size", "w1_expected_checksum", "w1_nbufs", "w1_pool", "w1_record", "w1_slice", "w1_touch",
    "w2_check", "w2_columnar_consume", "w2_columns", "w2_expected", "w2_record", "w2_row_consume", "w2_rows",
    "w3_check", "w3_corpus_path", "w3_corpus_text", "w3_generate", "w3_head_lines", "w3_line_ranges",
    "w3_merge", "w3_owner", "w3_record", "w3_reference", "w3_tokens",
    "W4_BOUND_K", "W4_CHUNK", "W4_K", "W4_MANAGED_BYTES", "W4_N", "W4_QUICK_K", "W4_QUICK_N", "W4_RSS_SLACK",
    "W4_STRIDE", "w4_add_checksums", "w4_checksum", "w4_checksum_columns", "w4_checksum_rows", "w4_chunks",
    "w4_columns", "w5_checksum_updates",
    "w4_dict_baseline", "w4_expected", "w4_key_index", "w4_key_str", "w4_record", "w4_rows", "w4_scale",
]

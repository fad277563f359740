"""runtime.checkpoint.storage: checkpoints on disk, written durably, never used torn or corrupt.

Real files under pytest's tmp_path; one test SIGKILLs a real second process in the middle of a write.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import tempfile
from pathlib import Path

import pytest
from helpers import SPAWN, reap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.checkpoint import (
    DEPENDS_ON_KEY,
    CheckpointMetadata,
    CheckpointStorage,
    StateHandle,
    default_checkpoints_dir,
    list_checkpoints,
    load_checkpoint,
    write_state_file,
)
from runtime.checkpoint import storage as storage_module
from runtime.errors import CheckpointError, InvalidArgumentError

JOB = "job-7f3a"


def metadata(checkpoint_id: int, subtasks: dict[str, StateHandle], job_id: str = JOB, **extra) -> CheckpointMetadata:
    return CheckpointMetadata(checkpoint_id=checkpoint_id, job_id=job_id, job_name="wordcount",
                              timestamp=1_700_000_000.0 + checkpoint_id, duration=0.25, subtasks=subtasks,
                              graph_fingerprint={"source-1": "source/p2", "count-2": "reduce/p2"}, extra=extra)


def take_checkpoint(store: CheckpointStorage, checkpoint_id: int, states: dict[str, bytes]):
    directory = store.checkpoint_dir(checkpoint_id)
    handles = {key: write_state_file(directory, key.replace("/", "-"), data) for key, data in states.items()}
    return store.complete(metadata(checkpoint_id, handles, job_id=store.job_id))


def temporary_files(root: Path) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".tmp"))


def test_round_trip(tmp_path):
    store = CheckpointStorage(tmp_path, JOB)
    assert store.latest() is None
    directory = store.checkpoint_dir(1)
    assert directory == tmp_path / JOB / "chk-1" and directory.is_dir()
    big = os.urandom(3 * (1 << 20) + 17)  # several write pieces, the last one short
    handles = {"count-2/0": write_state_file(directory, "count-2-0", big),
               "count-2/1": write_state_file(directory, "count-2-1", b""),
               "source-1/0": write_state_file(directory, "source-1-0", bytearray(b"offset 42"))}
    assert handles["count-2/0"].nbytes == len(big) and handles["count-2/1"].nbytes == 0
    meta = metadata(1, handles, positions={0: 42, 1: [3, "file.txt"]})
    completed = store.complete(meta)
    assert completed.checkpoint_id == 1 and completed.job_id == JOB

    for found in (store.latest(), load_checkpoint(directory), load_checkpoint(directory / "_metadata"),
                  load_checkpoint(str(directory))):
        assert found is not None
        assert found.metadata == meta
        assert found.read_state("count-2/0") == big
        assert found.read_state("count-2/1") == b""
        assert found.read_state("source-1/0") == b"offset 42"
    assert sorted(os.listdir(directory)) == ["_metadata", "count-2-0", "count-2-1", "source-1-0"]
    assert temporary_files(tmp_path) == []


def test_handles_and_metadata_survive_the_wire():
    handle = StateHandle("op-0", 12, "ab" * 4)
    assert StateHandle.from_wire(handle.to_wire()) == handle
    meta = metadata(3, {"op/0": handle}, watermark=17)
    assert CheckpointMetadata.from_wire(meta.to_wire(), source="x") == meta
    with pytest.raises(CheckpointError, match=r"^peer: a state file name must be one plain path component; got '\.\./x'$"):
        StateHandle.from_wire(["../x", 1, "ab" * 4])
    with pytest.raises(CheckpointError, match=r"^peer: a state handle must be \[file name, size >= 0, CRC-32 hex\]; got \['x', -1, 'ab'\]$"):
        StateHandle.from_wire(["x", -1, "ab"])


def test_graph_mismatches_name_each_operator():
    meta = metadata(4, {})
    assert meta.graph_mismatches({"source-1": "source/p2", "count-2": "reduce/p2"}) == []
    assert meta.graph_mismatches({"source-1": "source/p4", "sink-3": "print/p1"}) == [
        "operator 'count-2' has state in checkpoint 4 but is not in the job",
        "operator 'sink-3' is in the job but not in checkpoint 4",
        "operator 'source-1' changed: 'source/p2' in checkpoint 4, 'source/p4' in the job",
    ]


@pytest.mark.parametrize("retained", [1, 2, 3])
def test_retention_keeps_exactly_the_newest(tmp_path, retained):
    store = CheckpointStorage(tmp_path, JOB, retained=retained)
    for n in range(1, 7):
        take_checkpoint(store, n, {"op/0": f"state {n}".encode()})
        kept = list(range(max(1, n - retained + 1), n + 1))
        assert store.completed_ids() == kept
        assert sorted(os.listdir(tmp_path / JOB)) == sorted(f"chk-{k}" for k in kept)
    latest = store.latest()
    assert latest is not None and latest.read_state("op/0") == b"state 6"


def test_incomplete_checkpoint_is_ignored_then_removed(tmp_path):
    store = CheckpointStorage(tmp_path, JOB)
    take_checkpoint(store, 1, {"op/0": b"one"})
    incomplete = store.checkpoint_dir(2)
    write_state_file(incomplete, "op-0", b"two")
    latest = store.latest()
    assert latest is not None and latest.checkpoint_id == 1 and latest.read_state("op/0") == b"one"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(incomplete))} is not a complete checkpoint: it has no _metadata \(it never completed\)$"):
        load_checkpoint(incomplete)

    CheckpointStorage(tmp_path, JOB)  # a restarted coordinator
    assert sorted(os.listdir(tmp_path / JOB)) == ["chk-1"]


def test_complete_subsumes_older_incomplete_checkpoints_only(tmp_path):
    store = CheckpointStorage(tmp_path, JOB)
    store.checkpoint_dir(1)
    store.checkpoint_dir(2)
    take_checkpoint(store, 3, {"op/0": b"three"})
    store.checkpoint_dir(4)
    assert sorted(os.listdir(tmp_path / JOB)) == ["chk-3", "chk-4"]
    with pytest.raises(CheckpointError, match=r"^checkpoint 2 of job job-7f3a cannot begin: ids must increase, and checkpoint 3 is complete; use 4 or above$"):
        store.checkpoint_dir(2)
    with pytest.raises(CheckpointError, match=r"^checkpoint 3 of job job-7f3a is complete and cannot be aborted \(.*chk-3\)$"):
        store.abort(3)
    store.abort(4)
    store.abort(4)  # gone already: nothing to do
    assert sorted(os.listdir(tmp_path / JOB)) == ["chk-3"]


def test_complete_checks_the_state_files_and_the_job(tmp_path):
    store = CheckpointStorage(tmp_path, JOB)
    directory = store.checkpoint_dir(1)
    handle = write_state_file(directory, "op-0", b"abc")
    with pytest.raises(InvalidArgumentError, match=r"^metadata of job 'other' cannot complete a checkpoint of job 'job-7f3a'$"):
        store.complete(metadata(1, {"op/0": handle}, job_id="other"))
    missing = StateHandle("op-1", 5, "00" * 4)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file {re.escape(str(directory / 'op-1'))} is missing; the checkpoint records it with 5 bytes$"):
        store.complete(metadata(1, {"op/0": handle, "op/1": missing}))
    assert store.completed_ids() == []
    store.abort(1)
    with pytest.raises(CheckpointError, match=r"^checkpoint 1 of job job-7f3a cannot complete: .*chk-1 does not exist \(aborted\?\); begin a checkpoint with checkpoint_dir\(\)$"):
        store.complete(metadata(1, {"op/0": handle}))
    with pytest.raises(CheckpointError, match=r"^cannot create checkpoint file .*chk-1/op-0: \[Errno 2\] No such file or directory: .*$"):
        write_state_file(directory, "op-0", b"late")  # a worker writing into an aborted checkpoint
    assert not directory.exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"^CheckpointStorage\(retained=\.\.\.\) must be an int >= 1; got 0$"):
        CheckpointStorage(tmp_path, JOB, retained=0)
    with pytest.raises(InvalidArgumentError, match=r"^job id must be 1 to 200 characters of letters, digits, '\.', '_' and '-', starting with a letter or digit; got '\.\./x'$"):
        CheckpointStorage(tmp_path, "../x")
    with pytest.raises(InvalidArgumentError, match=r"^job id must not have the form of a checkpoint directory \(chk-<n>\); got 'chk-3'$"):
        CheckpointStorage(tmp_path, "chk-3")
    store = CheckpointStorage(tmp_path, JOB)
    directory = store.checkpoint_dir(1)
    with pytest.raises(InvalidArgumentError, match=r"^state file name must be .*; got '_metadata'$"):
        write_state_file(directory, "_metadata", b"x")
    with pytest.raises(InvalidArgumentError, match=r"^checkpoint id must be >= 0; got -1$"):
        store.checkpoint_dir(-1)
    with pytest.raises(CheckpointError, match=r"^metadata of checkpoint 1 cannot be encoded: every field \(extra too\) must be msgpack-able; .*$"):
        store.complete(metadata(1, {}, bad={1, 2}))
    assert store.completed_ids() == [] and temporary_files(tmp_path) == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = CheckpointStorage(tmp_path, JOB)
    directory = store.checkpoint_dir(1)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_module.os, "fsync", no_space)
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint file {re.escape(str(directory / 'op-0'))} \(3 bytes\): \[Errno 28\] No space left on device$"):
        write_state_file(directory, "op-0", b"abc")
    assert os.listdir(directory) == []


def test_metadata_not_known_durable_does_not_complete(tmp_path, monkeypatch):
    store = CheckpointStorage(tmp_path, JOB)
    directory = store.checkpoint_dir(1)
    handle = write_state_file(directory, "op-0", b"abc")
    real_fsync_dir = storage_module._fsync_dir

    def fsync_dir(path):
        if Path(path) == tmp_path / JOB:
            raise OSError(5, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(storage_module, "_fsync_dir", fsync_dir)
    with pytest.raises(CheckpointError, match=rf"^cannot make checkpoint {re.escape(str(directory))} durable: \[Errno 5\] Input/output error$"):
        store.complete(metadata(1, {"op/0": handle}))
    assert store.completed_ids() == [] and os.listdir(directory) == ["op-0"]


# ------------------------------------------------------------------------------------- corruption


def corrupt_checkpoint(tmp_path) -> tuple[Path, dict[str, StateHandle]]:
    store = CheckpointStorage(tmp_path, JOB)
    directory = store.checkpoint_dir(1)
    handles = {"op/0": write_state_file(directory, "op-0", b"0123456789" * 100)}
    store.complete(metadata(1, handles))
    return directory, handles


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated state file": (
        lambda d: os.truncate(d / "op-0", 600),
        r"checkpoint file {d}/op-0 is truncated: expected 1000 bytes, found 600"),
    "flipped byte in state file": (
        lambda d: flip_byte(d / "op-0", 500),
        r"checkpoint file {d}/op-0 fails its checksum: CRC-32 [0-9a-f]{{8}}\.\.\., recorded [0-9a-f]{{8}}\.\.\.; "
        r"the file is corrupt"),
    "missing state file": (
        lambda d: os.unlink(d / "op-0"),
        r"checkpoint file {d}/op-0 is missing; the checkpoint records it with 1000 bytes"),
    "flipped byte in _metadata": (
        lambda d: flip_byte(d / "_metadata", 60),
        r"checkpoint file {d}/_metadata fails its checksum: SHA-256 [0-9a-f]{{16}}\.\.\., recorded [0-9a-f]{{16}}\.\.\.; "
        r"the file is corrupt"),
    "truncated _metadata": (
        lambda d: os.truncate(d / "_metadata", 70),
        r"checkpoint file {d}/_metadata is truncated: expected \d+ bytes, found 70"),
    "wrong magic": (
        lambda d: (d / "_metadata").write_bytes(b"PK\x03\x04" + b"\0" * 100),
        r"{d}/_metadata is not a shmflow checkpoint: it must start with b'SHMFCHK\\x00'; got b'PK\\x03\\x04\\x00\\x00\\x00\\x00'"),
    "unsupported version": (
        lambda d: (d / "_metadata").write_bytes(
            (d / "_metadata").read_bytes()[:8] + struct.pack(">H", 7) + (d / "_metadata").read_bytes()[10:]),
        r"{d}/_metadata has unsupported format version 7; this shmflow reads version 2"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_raises_checkpoint_error_naming_the_file(tmp_path, kind):
    directory, _ = corrupt_checkpoint(tmp_path)
    damage, message = CORRUPTIONS[kind]
    damage(directory)
    expected = "^" + message.format(d=re.escape(str(directory))) + "$"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(directory)
    assert CheckpointStorage(tmp_path, JOB).latest() is None  # never used; left in place for inspection
    info, = list_checkpoints(tmp_path)
    assert info.complete
    if "state" in kind and "flipped" in kind:
        assert info.problem is None  # a listing checks sizes only
    else:
        assert info.problem is not None and re.match(expected, info.problem)


def test_read_state_checks_the_file_again(tmp_path):
    directory, _ = corrupt_checkpoint(tmp_path)
    loaded = load_checkpoint(directory)
    flip_byte(directory / "op-0", 3)
    with pytest.raises(CheckpointError, match=r"^checkpoint file .*/op-0 fails its checksum: .*; the file is corrupt$"):
        loaded.read_state("op/0")
    with pytest.raises(CheckpointError, match=r"^checkpoint 1 in .*chk-1 has no state for subtask 'op/9'; it has: op/0$"):
        loaded.read_state("op/9")


def test_latest_falls_back_past_a_corrupt_checkpoint(tmp_path):
    store = CheckpointStorage(tmp_path, JOB, retained=2)
    take_checkpoint(store, 1, {"op/0": b"one"})
    take_checkpoint(store, 2, {"op/0": b"two"})
    flip_byte(tmp_path / JOB / "chk-2" / "op-0", 1)
    latest = store.latest()
    assert latest is not None and latest.checkpoint_id == 1 and latest.read_state("op/0") == b"one"


# ---------------------------------------------------------------------------------------- listing


def test_list_checkpoints_of_a_root_and_of_a_job(tmp_path):
    first = CheckpointStorage(tmp_path, "job-a", retained=2)
    take_checkpoint(first, 1, {"op/0": b"x" * 10})
    take_checkpoint(first, 2, {"op/0": b"y" * 20, "op/1": b"z"})
    first.checkpoint_dir(3)
    second = CheckpointStorage(tmp_path, "job-b")
    take_checkpoint(second, 5, {"op/0": b""})

    infos = list_checkpoints(tmp_path)
    assert [(i.job_id, i.checkpoint_id, i.complete, i.problem) for i in infos] == [
        ("job-a", 1, True, None), ("job-a", 2, True, None), ("job-a", 3, False, None), ("job-b", 5, True, None)]
    assert infos[0].timestamp == 1_700_000_001.0 and infos[0].path == tmp_path / "job-a" / "chk-1"
    metadata_size = (tmp_path / "job-a" / "chk-2" / "_metadata").stat().st_size
    assert infos[1].nbytes == 21 + metadata_size and infos[2].nbytes == 0
    assert list_checkpoints(tmp_path / "job-b") == infos[3:]
    with pytest.raises(CheckpointError, match=r"^checkpoint directory .*/nowhere does not exist; set state\.checkpoints\.dir or pass another directory$"):
        list_checkpoints(tmp_path / "nowhere")


def test_discard_all(tmp_path):
    store = CheckpointStorage(tmp_path, JOB, retained=2)
    take_checkpoint(store, 1, {"op/0": b"one"})
    take_checkpoint(store, 2, {"op/0": b"two"})
    store.discard_all()
    assert os.listdir(tmp_path) == []
    assert store.latest() is None
    take_checkpoint(store, 3, {"op/0": b"three"})  # still usable
    assert store.completed_ids() == [3]


def test_default_checkpoints_dir(monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", "/data/alice")
    assert default_checkpoints_dir() == "/data/alice/shmflow/checkpoints"
    monkeypatch.setenv("HOME", "/home/alice")
    for relative in ("", "data"):  # unset, or relative: ignored as the XDG specification says
        monkeypatch.setenv("XDG_DATA_HOME", relative)
        assert default_checkpoints_dir() == "/home/alice/.local/share/shmflow/checkpoints"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_checkpoints_dir() == "/home/alice/.local/share/shmflow/checkpoints"


# ------------------------------------------------------------------------------ random sequences


OPERATIONS = st.lists(st.tuples(st.sampled_from(["begin", "write", "complete", "abort", "restart"]),
                                st.integers(0, 20), st.sampled_from(["a", "b", "c"]), st.binary(max_size=64)),
                      max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, retained=st.integers(1, 3))
def test_random_sequences_match_a_model(operations, retained):
    """Model: in-flight checkpoints (id -> name -> bytes) and complete ones, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = CheckpointStorage(root, JOB, retained=retained)
        in_flight: dict[int, dict[str, bytes]] = {}
        handles: dict[int, dict[str, StateHandle]] = {}
        completed: list[tuple[int, dict[str, bytes]]] = []
        next_id = 1
        for op, pick, name, data in operations:
            begun = list(range(1, next_id))
            target = begun[pick % len(begun)] if begun else 1
            kept = [n for n, _ in completed[-retained:]]
            if op == "begin":
                store.checkpoint_dir(next_id)
                in_flight[next_id], handles[next_id] = {}, {}
                next_id += 1
            elif op == "write" and in_flight:
                target = sorted(in_flight)[pick % len(in_flight)]
                handles[target][name] = write_state_file(store.checkpoint_dir(target), name, data)
                in_flight[target][name] = data
            elif op == "complete":
                if target in in_flight:
                    store.complete(metadata(target, handles[target]))
                    completed.append((target, in_flight.pop(target)))
                    for older in [n for n in in_flight if n < target]:
                        del in_flight[older]
                else:
                    with pytest.raises(CheckpointError):
                        store.complete(metadata(target, handles.get(target, {})))
            elif op == "abort":
                if target in kept:
                    with pytest.raises(CheckpointError, match="cannot be aborted"):
                        store.abort(target)
                else:
                    store.abort(target)
                    in_flight.pop(target, None)
            elif op == "restart":
                store = CheckpointStorage(root, JOB, retained=retained)
                in_flight.clear()

            kept = [n for n, _ in completed[-retained:]]
            assert store.completed_ids() == kept
            assert sorted(os.listdir(root / JOB)) == sorted(f"chk-{n}" for n in [*kept, *in_flight])
            assert temporary_files(root) == []
            latest = store.latest()
            if not completed:
                assert latest is None
            else:
                assert latest is not None and latest.checkpoint_id == completed[-1][0]
                assert {k: latest.read_state(k) for k in latest.metadata.subtasks} == completed[-1][1]


# ------------------------------------------------------------------------- a writer killed mid-way


def crash_child(root: str, stage: str, conn) -> None:
    """Begin checkpoint 2 of JOB and stop at ``stage`` (telling the parent) until the parent SIGKILLs us."""
    real_os = os

    class StoppingOs:
        """Stands in for the storage module's ``os``: one call stops this process at the chosen point."""

        def __getattr__(self, name):
            return getattr(real_os, name)

    def stop() -> None:
        conn.send("stopped")
        conn.recv()  # never answered: the parent kills this process here

    hooked = StoppingOs()
    writes = []

    def write(fd, data):
        writes.append(len(data))
        if stage == "mid-write" and len(writes) == 4:
            stop()
        return real_os.write(fd, data)

    def replace(src, dst):
        if stage == "state-rename" or (stage == "metadata-rename" and Path(dst).name == "_metadata"):
            stop()
        return real_os.replace(src, dst)

    hooked.write, hooked.replace = write, replace
    storage_module.os = hooked
    store = CheckpointStorage(root, JOB)
    handle = write_state_file(store.checkpoint_dir(2), "op-0", b"x" * (16 << 20))
    store.complete(metadata(2, {"op/0": handle}))
    conn.send("completed")  # not reached


@pytest.mark.parametrize("stage", ["mid-write", "state-rename", "metadata-rename"])
def test_a_killed_writer_leaves_the_previous_checkpoint(tmp_path, stage):
    store = CheckpointStorage(tmp_path, JOB)
    take_checkpoint(store, 1, {"op/0": b"one"})
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=crash_child, args=(str(tmp_path), stage, child))
    proc.start()
    child.close()
    try:
        assert parent.poll(60), f"the child never reached {stage}"
        assert parent.recv() == "stopped"
        chk2 = tmp_path / JOB / "chk-2"
        temps = [n for n in os.listdir(chk2) if n.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].startswith("._metadata." if stage == "metadata-rename" else ".op-0.")
        if stage == "mid-write":
            assert (chk2 / temps[0]).stat().st_size == 3 << 20  # three of sixteen pieces written
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        reap(proc)
        parent.close()

    latest = store.latest()  # before any cleanup: chk-2 has no _metadata
    assert latest is not None and latest.checkpoint_id == 1
    restarted = CheckpointStorage(tmp_path, JOB)
    latest = restarted.latest()
    assert latest is not None and latest.checkpoint_id == 1 and latest.read_state("op/0") == b"one"
    assert os.listdir(tmp_path / JOB) == ["chk-1"]
    assert temporary_files(tmp_path) == []


def test_retention_keeps_the_checkpoints_an_incremental_one_builds_on(tmp_path):
    store = CheckpointStorage(tmp_path, JOB, retained=1)

    def take(checkpoint_id: int, depends_on: int) -> None:
        directory = store.checkpoint_dir(checkpoint_id)
        handles = {"count-2/0": write_state_file(directory, "count-2-0", b"x" * checkpoint_id)}
        store.complete(metadata(checkpoint_id, handles, **{DEPENDS_ON_KEY: depends_on}))

    take(1, 1)  # full
    take(2, 1)  # the changes since 1
    take(3, 1)  # the changes since 1 again (2 was not known complete when 3 was taken)
    assert store.completed_ids() == [1, 2, 3]  # 3 is retained, and 1 (and what lies between) with it
    take(4, 4)  # full again: the chain before it goes
    assert store.completed_ids() == [4]

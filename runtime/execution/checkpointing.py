"""A worker's side of checkpoints: where its subtasks' snapshots go, and how a restarted job reads them back.

Imports: runtime.checkpoint, runtime.state.codec, runtime.errors (stdlib otherwise).

The coordinator triggers checkpoint ``n`` (it has made ``chk-<n>`` in the
job's checkpoint directory); each subtask, when its barriers are aligned
(a source: at once), encodes its operators' states (:func:`encode_states`:
a header and the large buffers it holds out of band), lays them out as one
blob (``runtime.checkpoint.blob``) in the worker's checkpoint area of the
shared region when it fits (:mod:`runtime.execution.checkpoint_area`), and
writes that blob as one file named by its :func:`subtask_key` there
(``runtime.checkpoint.write_state_file``); the acknowledgement carries the
file's handle (name, size, CRC-32) and where the blob lies in the region,
which the coordinator records.

A restarted job is deployed with the directory of the checkpoint to restore
and, when the coordinator still holds that checkpoint's blobs in the region
(a restart, not a new run), where each subtask's blob lies. A subtask reads
its blob in place when its checksum is the one the metadata records, and its
file otherwise (:meth:`CheckpointSetup.restored_states`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.checkpoint import CompletedCheckpoint, checkpoint_path, load_checkpoint, state_checksum
from runtime.checkpoint.blob import read_blob
from runtime.errors import CheckpointError
from runtime.state import codec

__all__ = ["FINISHED_KEY", "CheckpointSetup", "decode_states", "depends_on", "encode_states", "shared_key",
           "subtask_key"]

#: The key of a checkpoint's metadata ``extra`` that lists the subtasks that had finished (they hold no file).
FINISHED_KEY = "finished"


def subtask_key(vertex_id: int, index: int) -> str:
    """How a checkpoint names one subtask: ``"<vertex id>-<index>"``."""
    return f"{vertex_id}-{index}"


@dataclass
class CheckpointSetup:
    """What a worker's job needs to take checkpoints and to start from one (from its Deploy message).

    ``directory`` is the job's checkpoint directory (``""``: no checkpoints);
    ``align`` is exactly-once (barriers aligned) rather than at-least-once;
    ``restore_dir`` is the directory of the checkpoint to start from (``""``: a fresh start);
    ``restore_shared`` maps :func:`shared_key` (checkpoint id and subtask key) to ``[region offset, bytes]``
    of that blob in the shared region (the checkpoint to restore's, and the earlier ones incremental
    snapshots build on), and ``region_view(offset, nbytes)`` gives a view of the region there.
    Ownership: the job's; the checkpoint it loads and the blobs it reads are read-only.
    """

    directory: str = ""
    align: bool = True
    restore_dir: str = ""
    restore_shared: dict[str, list[int]] = field(default_factory=dict)
    #: ``[region offset, bytes]`` of the worker's checkpoint area ([]: none; blobs stay on the heap).
    area: list[int] = field(default_factory=list)
    region_view: Callable[[int, int], memoryview] | None = None
    #: How many subtasks were restored from the region, and from files (the job's metrics).
    restored_from_memory: int = 0
    restored_from_files: int = 0
    _restored: CompletedCheckpoint | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.directory)

    def _checkpoint(self) -> CompletedCheckpoint:
        restored = self._restored
        if restored is None:
            restored = self._restored = load_checkpoint(self.restore_dir, verify_state=False)
        return restored

    def first_checkpoint(self) -> int:
        """The id the job's first checkpoint will have at the least: one above the restored one (or 1)."""
        return self._checkpoint().checkpoint_id + 1 if self.restore_dir else 1

    def restored_states(self, key: str) -> list[Any] | None:
        """The operator states subtask ``key`` snapshotted in the checkpoint to restore; None: it had finished.

        An operator's :class:`~runtime.state.codec.Incremental` snapshot comes back as a
        :class:`~runtime.state.codec.Chain`: the full snapshot it builds on and every delta since, read from
        the earlier checkpoints of the same job (their blobs in the region, or their files).

        Raises:
            CheckpointError: the checkpoint, an earlier one a chain needs, or a file is missing, truncated or
                corrupt, or the checkpoint has no state for ``key`` (names the checkpoint and the subtask).
        """
        restored = self._checkpoint()
        meta = restored.metadata
        if key in meta.extra.get(FINISHED_KEY, ()):
            return None
        states = self._states_in(restored, key)
        for i, state in enumerate(states):
            if type(state) is codec.Incremental:
                states[i] = self._chain(restored, key, i, state)
        return states

    def _states_in(self, checkpoint: CompletedCheckpoint, key: str) -> list[Any]:
        """Subtask ``key``'s operator states in ``checkpoint``: its blob in the region if it is there and intact
        (its checksum is the file's), else its file (a blob overwritten since, or never copied to the region)."""
        meta = checkpoint.metadata
        handle = meta.subtasks.get(key)
        if handle is None:
            msg = (f"checkpoint {checkpoint.directory} holds no state for subtask {key}; it was taken of another "
                   f"job graph")
            raise CheckpointError(msg)
        where = self.restore_shared.get(shared_key(meta.checkpoint_id, key))
        if where and self.region_view is not None and where[1] == handle.nbytes:
            view = self.region_view(where[0], where[1])
            if state_checksum(view) == handle.checksum:
                self.restored_from_memory += 1
                return decode_states(view, source=f"the region's copy of {key} in checkpoint {meta.checkpoint_id}")
        self.restored_from_files += 1
        return decode_states(checkpoint.read_state(key), source=f"{checkpoint.directory}/{handle.name}")

    def _chain(self, restored: CompletedCheckpoint, key: str, index: int, last: codec.Incremental) -> codec.Chain:
        """Operator ``index`` of subtask ``key``: its full snapshot and its deltas up to ``last``."""
        deltas = [last.delta]
        parent = last.parent
        while True:
            if not 0 < parent < restored.metadata.checkpoint_id:
                msg = (f"checkpoint {restored.directory}: subtask {key}'s operator {index} builds on checkpoint "
                       f"{parent}, which cannot be one of its parents")
                raise CheckpointError(msg)
            earlier = load_checkpoint(checkpoint_path(restored.directory.parent, parent), verify_state=False)
            states = self._states_in(earlier, key)
            if index >= len(states):
                msg = (f"checkpoint {earlier.directory} holds {len(states)} operator states for subtask {key}; "
                       f"checkpoint {restored.checkpoint_id} builds on its state {index}")
                raise CheckpointError(msg)
            state = states[index]
            if type(state) is not codec.Incremental:
                return codec.Chain(state, deltas[::-1])
            deltas.append(state.delta)
            parent = state.parent


def shared_key(checkpoint_id: int, subtask: str) -> str:
    """How a Deploy's ``restore_shared`` names a blob: ``"<checkpoint id>/<subtask key>"``."""
    return f"{checkpoint_id}/{subtask}"


def depends_on(states: list[Any], checkpoint_id: int) -> int:
    """The oldest checkpoint whose files a snapshot of ``states`` for ``checkpoint_id`` needs."""
    return min([checkpoint_id, *(s.base for s in states if type(s) is codec.Incremental)])


def encode_states(states: list[Any], subtask: str) -> tuple[bytes, list[Any]]:
    """One subtask's operator states as a header and the buffers its states hold out of band
    (:func:`runtime.state.codec.encode_parts`); :mod:`runtime.checkpoint.blob` lays them out.

    Raises:
        StateSerializationError: a state holds a value the codec cannot encode (names the subtask and type).
    """
    return codec.encode_parts(states, state=f"checkpoint of subtask {subtask}")


def decode_states(data: bytes | memoryview, *, source: str = "a snapshot") -> list[Any]:
    """Inverse of :func:`encode_states`, from a blob: out-of-band buffers come back as views of ``data``.

    Raises:
        CheckpointError: ``data`` is not a blob, is torn, or does not hold a list of operator states.
    """
    header, buffers = read_blob(memoryview(data), source=source)
    states = codec.decode_parts(header, buffers)
    if not isinstance(states, list):
        msg = f"a subtask's checkpoint state must be a list of operator states; got {type(states).__name__}"
        raise CheckpointError(msg)
    return states

"""A worker's side of checkpoints: where its subtasks' snapshots go, and how a restarted job reads them back.

Imports: runtime.checkpoint, runtime.state.codec, runtime.errors (stdlib otherwise).

The coordinator triggers checkpoint ``n`` (it has made ``chk-<n>`` in the
job's checkpoint directory); each subtask, when its barriers are aligned
(a source: at once), encodes its operators' states (:func:`encode_states`)
and writes them as one file named by its :func:`subtask_key` there
(``runtime.checkpoint.write_state_file``); the acknowledgement carries the
file's handle (name, size, SHA-256), which the coordinator records in the
checkpoint's metadata. A restarted job is deployed with the directory of
the checkpoint to restore; each subtask reads its own file back, checked
against the metadata (:meth:`CheckpointSetup.restored_states`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.checkpoint import CompletedCheckpoint, load_checkpoint
from runtime.errors import CheckpointError
from runtime.state import codec

__all__ = ["FINISHED_KEY", "CheckpointSetup", "decode_states", "encode_states", "subtask_key"]

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
    ``restore_dir`` is the directory of the checkpoint to start from (``""``: a fresh start).
    Ownership: the job's; the checkpoint it loads is read-only.
    """

    directory: str = ""
    align: bool = True
    restore_dir: str = ""
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

        Raises:
            CheckpointError: the checkpoint or the subtask's file is missing, truncated or corrupt, or the
                checkpoint has no state for ``key`` (names the checkpoint and the subtask).
        """
        restored = self._checkpoint()
        meta = restored.metadata
        if key in meta.extra.get(FINISHED_KEY, ()):
            return None
        if key not in meta.subtasks:
            msg = (f"checkpoint {restored.directory} holds no state for subtask {key}; it was taken of another "
                   f"job graph")
            raise CheckpointError(msg)
        return decode_states(restored.read_state(key))


def encode_states(states: list[Any], subtask: str) -> bytes:
    """One subtask's operator states as bytes (:mod:`runtime.state.codec`).

    Raises:
        StateSerializationError: a state holds a value the codec cannot encode (names the subtask and type).
    """
    return codec.encode(states, state=f"checkpoint of subtask {subtask}")


def decode_states(data: bytes) -> list[Any]:
    states = codec.decode(data)
    if not isinstance(states, list):
        msg = f"a subtask's checkpoint state must be a list of operator states; got {type(states).__name__}"
        raise CheckpointError(msg)
    return states

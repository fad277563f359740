"""Fault tolerance: checkpoints of a job's state, and restoring from them.

``storage``: where a job's checkpoints live on disk (``<root>/<job id>/chk-<n>/``), written so that a torn
or corrupt checkpoint is never used.

Imports: runtime.errors, runtime.io, runtime.config (stdlib and msgpack otherwise). Never zmq or cloudpickle,
runtime.execution or runtime.cluster.
"""

from runtime.checkpoint.storage import (
    DEPENDS_ON_KEY,
    CheckpointInfo,
    CheckpointMetadata,
    CheckpointStorage,
    CompletedCheckpoint,
    StateHandle,
    checkpoint_path,
    default_checkpoints_dir,
    list_checkpoints,
    load_checkpoint,
    state_checksum,
    write_state_file,
)

__all__ = [
    "DEPENDS_ON_KEY", "CheckpointInfo", "CheckpointMetadata", "CheckpointStorage", "CompletedCheckpoint", "StateHandle",
    "checkpoint_path", "default_checkpoints_dir", "list_checkpoints", "load_checkpoint", "state_checksum",
    "write_state_file",
]

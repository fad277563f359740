import numpy as np

def upsert(table: np.ndarray, capacity: int, width: int, key_words: int, codes: bytes, rows: np.ndarray,
           start: int, room: int, stop_when_full: bool, left: np.ndarray, /) -> tuple[int, int, int]: ...

def upsert_emit(table: np.ndarray, capacity: int, width: int, key_words: int, codes: bytes, rows: np.ndarray,
                start: int, room: int, out: np.ndarray, /) -> tuple[int, int]: ...

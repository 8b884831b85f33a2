"""Type stub of the native module ``shoal._native`` (built from crates/shoal-py)."""

from collections.abc import Iterable
from pathlib import Path
from typing import Any, final

__all__ = [
    "KIND_RELEASE",
    "KIND_SETUP",
    "KIND_SHUTDOWN",
    "KIND_TASK",
    "OUTCOME_DONE",
    "OUTCOME_MEMORY_EXCEEDED",
    "OUTCOME_PARTIAL",
    "OUTCOME_START_FAILED",
    "OUTCOME_TIMED_OUT",
    "OUTCOME_WORKER_LOST",
    "ChunkSizer",
    "Engine",
    "EngineError",
    "Mapping",
    "ProgressBar",
    "Segment",
    "WorkerChannel",
    "at_exit",
    "blake2b_many",
    "buffer_span",
    "content_hash",
    "cpu_count",
    "pack_plain",
    "pickle_plain",
    "signal_name",
    "store_rows",
    "total_memory",
    "unpack_plain",
]

KIND_SETUP: int
KIND_TASK: int
KIND_RELEASE: int
KIND_SHUTDOWN: int
OUTCOME_DONE: int
OUTCOME_WORKER_LOST: int
OUTCOME_START_FAILED: int
OUTCOME_TIMED_OUT: int
OUTCOME_MEMORY_EXCEEDED: int
OUTCOME_PARTIAL: int

class EngineError(RuntimeError): ...

@final
class Engine:
    """A pool of worker processes (the processes backend's engine)."""

    def __new__(
        cls,
        program: str | Path,
        args: list[str],
        env: list[tuple[str, str]],
        workers: int,
        idle_timeout: float | None = None,
        target_chunk_s: float = 0.004,
        max_chunk: int = 50000,
        machine_interval: float = 0.5,
        queue_any: bool = False,
    ) -> Engine: ...
    @property
    def workers(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def prestart(self, count: int) -> None: ...
    def open_session(
        self,
        ordered: bool,
        timeout: float | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | None = None,
        max_load: float | None = None,
        max_memory: int | None = None,
    ) -> int: ...
    def add_setup(self, session: int, blob: bytes) -> int: ...
    def hint_setup(self, setup: int, per_item_ns: float) -> None: ...
    def item_ns(self, setup: int) -> float | None: ...
    def remove_setup(self, setup: int) -> None: ...
    def submit(self, setup: int, weight: int, payload: bytes, exclusive: bool = False) -> int: ...
    def chunk_size(self, setup: int, remaining: int | None = None) -> int: ...
    def cancel(self, session: int, seqs: list[int] | None = None) -> list[int]: ...
    def close_session(self, session: int, abort: bool = False) -> None: ...
    def wake(self, session: int) -> None: ...
    def wait(
        self, session: int, timeout: float | None = None
    ) -> list[tuple[int, int, bytes, int, int | None, str, list[Segment]]]: ...
    def pids(self) -> list[int]: ...
    def shutdown(self, kill: bool = False) -> None: ...

@final
class WorkerChannel:
    """The worker's end of its channel to the driver."""

    def __new__(cls, fd: int) -> WorkerChannel: ...
    def hello(self, pid: int) -> None: ...
    def recv(self) -> tuple[int, int, int, bytes] | None: ...
    def send_result(
        self, task: int, elapsed_ns: int, payload: bytes, fds: list[int] = ...
    ) -> None: ...
    def send_partial(self, task: int, items: int, payload: bytes, fds: list[int] = ...) -> None: ...
    def flush(self) -> None: ...

@final
class ChunkSizer:
    """The adaptive chunk-size policy, for backends outside the native engine."""

    def __new__(
        cls, workers: int, target_chunk_s: float = 0.004, max_chunk: int = 50000
    ) -> ChunkSizer: ...
    def record(self, items: int, elapsed_ns: int) -> None: ...
    def size(self, remaining: int | None = None) -> int: ...

@final
class ProgressBar:
    """A progress bar on stderr, redrawn by a Rust thread."""

    def __new__(
        cls, total: int | None = None, label: str | None = None, interval: float = 0.1
    ) -> ProgressBar: ...
    def update(self, done: int, failed: int) -> None: ...
    def close(self) -> None: ...

@final
class Segment:
    """An anonymous shared-memory segment (memfd) holding a copy of one buffer."""

    def __new__(cls, data: object) -> Segment: ...
    @staticmethod
    def zeroed(size: int) -> Segment: ...
    @property
    def fd(self) -> int: ...
    @property
    def size(self) -> int: ...
    def close(self) -> None: ...

@final
class Mapping:
    """A mapping of a shared-memory segment (private unless ``shared``), exported as a buffer."""

    def __new__(cls, fd: int, size: int, shared: bool = False) -> Mapping: ...
    @property
    def address(self) -> int: ...
    def __len__(self) -> int: ...
    def revert_written(self) -> int:
        """Drop the pages this process wrote into a private mapping; return how many."""
    def __buffer__(self, flags: int, /) -> memoryview: ...

def cpu_count() -> int: ...
def signal_name(sig: int) -> str: ...
def total_memory() -> int: ...
def buffer_span(data: object) -> tuple[int, int]: ...
def content_hash(data: object) -> int: ...
def blake2b_many(key: bytes, digest_size: int, messages: list[bytes]) -> list[bytes]: ...
def pack_plain(
    start: int, values: list[object], lo: int = 0, hi: int | None = None
) -> bytes | None: ...
def unpack_plain(data: bytes) -> tuple[int, list[object]]: ...
def pickle_plain(values: Iterable[object]) -> list[bytearray] | None: ...
def store_rows(
    first_id: int,
    idents: list[bytes],
    idx: Iterable[int],
    values: list[Any],
    attempts: int,
) -> list[Any] | None: ...
def at_exit() -> None: ...

"""``mpiexec -n N python tests/mpi_faults.py FAULT script.py``: ``python -m shoal.mpi script.py``
with one fault injected into shoal's own code (MPI itself is real and untouched), for the tests
that check a failure in the link between rank 0 and the relays ends or fails, never hangs.

FAULT is one of:

- ``link-early``: rank 0 raises as it starts to set up its link to the relays;
- ``link-late``: rank 0 raises once every relay has reported for service;
- ``relay-start``: rank 2 raises while it starts to serve;
- ``reply-thread``: rank 1's reply thread raises on its first outcomes;
- ``rank0-receiver``: rank 0's receiver thread raises on the first outcomes it routes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

FAULTS = ("link-early", "link-late", "relay-start", "reply-thread", "rank0-receiver")


class InjectedFaultError(RuntimeError):
    pass


def _once(original: Any, what: str) -> Any:
    fired = []

    def patched(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            raise InjectedFaultError(f"injected fault: {what}")
        return original(*args, **kwargs)

    return patched


def inject(fault: str, rank: int) -> None:
    from shoal.backends import mpi as backend
    from shoal.mpi import _relay, _wire

    if fault == "link-early" and rank == 0:
        backend._Link.__init__ = _once(backend._Link.__init__, fault)  # type: ignore[method-assign]
    elif fault == "link-late" and rank == 0:
        # Rank 0 makes its doorbell once every relay has said hello.
        _wire.Bell.create = _once(_wire.Bell.create, fault)  # type: ignore[method-assign]
    elif fault == "relay-start" and rank == 2:
        _relay.Relay.__init__ = _once(_relay.Relay.__init__, fault)  # type: ignore[method-assign]
    elif fault == "reply-thread" and rank == 1:
        reply = _relay.Relay.reply

        def failing(self: Any, message: tuple[Any, ...], *args: Any, **kwargs: Any) -> None:
            # Only in a session's reply thread, which sends the outcomes ("done").
            if message[0] == "done" and not getattr(self, "fault_fired", False):
                self.fault_fired = True
                raise InjectedFaultError(f"injected fault: {fault}")
            reply(self, message, *args, **kwargs)

        _relay.Relay.reply = failing  # type: ignore[method-assign]
    elif fault == "rank0-receiver" and rank == 0:
        backend.MpiSession._deliver = _once(backend.MpiSession._deliver, fault)  # type: ignore[method-assign]


def main() -> None:
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault not in FAULTS:
        raise SystemExit(f"unknown fault {fault!r}; one of {FAULTS}")
    inject(fault, int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    from shoal.mpi.__main__ import main as shoal_mpi

    shoal_mpi(argv)


if __name__ == "__main__":
    main()

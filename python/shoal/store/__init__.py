"""Result stores: ``store=`` on every call, and :class:`Store` to read one back.

See ``docs/store.md``. The file is one SQLite database: :mod:`._db` (schema, journal mode,
lock), :mod:`._codec` (identities, values, exceptions), :mod:`._recorder` (the driver's hooks),
:mod:`._reader` (:class:`Store`).
"""

from ._db import StoreError, StoreWarning
from ._reader import Store

__all__ = ["Store", "StoreError", "StoreWarning"]

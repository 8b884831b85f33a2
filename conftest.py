"""How the examples of README.md and docs/*.md run under pytest (pytest-markdown-docs).

``make test`` runs every ```python block of those files as a test. Each block runs as the main
module of a fresh script would (``__name__ == "__main__"``, so the ``if __name__ ==
"__main__":`` guard of multiprocessing recipes runs too), with a few names that the pages use
without defining them (``simulate``, ``params``...) from ``tests/doc_globals.py``.

A block of another tool's code that needs a package the tests do not install (mpi4py, McUtils,
executorlib), or one that connects to a cluster of the reader's own (a scheduler address, a
Slurm partition), is written ```{.python .notest title="..."}```: Material renders it as
Python, and pytest-markdown-docs, which only collects blocks whose language is plainly
``python``, skips it. The backends those blocks use are tested against real local engines in
``tests/``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import sys
import tempfile
import types
from typing import Any

from pytest_markdown_docs._runners import DefaultRunner, register_runner

_GLOBALS = pathlib.Path(__file__).parent / "tests" / "doc_globals.py"

# The MPI examples (spawn mode) start Open MPI, whose shared-memory transport puts its
# sm_segment.* backing files in /dev/shm, where they outlive the processes: a directory of
# this run instead, removed when it ends. Spawned ranks inherit the variable.
_SM_BACKING = "OMPI_MCA_btl_sm_backing_directory"  # Open MPI's name, lower case included
if _SM_BACKING not in os.environ:
    import atexit
    import shutil

    _SEGMENTS = tempfile.mkdtemp(prefix="shoal-doc-mpi-sm-")
    os.environ[_SM_BACKING] = _SEGMENTS
    atexit.register(shutil.rmtree, _SEGMENTS, ignore_errors=True)
# An MPI singleton in this process (an example that imports mpi4py) needs no TCP transport, which
# would listen on every interface (and be inherited by forked workers): shared memory only.
os.environ.setdefault("OMPI_MCA_btl", "^tcp")


def _doc_globals() -> dict[str, Any]:
    # A module made at run time (no import spec), as a user's script would be: shoal sends its
    # functions to workers by value, so workers need not import anything from tests/.
    module = types.ModuleType("shoal_doc_globals")
    sys.modules[module.__name__] = module
    exec(compile(_GLOBALS.read_text(), str(_GLOBALS), "exec"), module.__dict__)
    return {k: v for k, v in module.__dict__.items() if not k.startswith("_")}


def pytest_markdown_docs_globals() -> dict[str, Any]:
    return _doc_globals()


@register_runner(default=True)
class ScriptRunner(DefaultRunner):
    """Run a block as ``__main__``, the way ``python script.py`` runs it."""

    def runtest(self, test: Any, args: dict[str, Any], **kwargs: Any) -> None:
        code = compile(test.source, str(test.source_path), "exec", dont_inherit=True)
        module = types.ModuleType("__main__")
        module.__dict__.update(args)
        module.__name__ = "__main__"
        previous = sys.modules["__main__"]
        # Pickling by reference (multiprocessing, concurrent.futures) finds the block's
        # functions in sys.modules["__main__"]; forked children inherit it.
        sys.modules["__main__"] = module
        # What the examples print is for readers: keep it out of the test log. Files they
        # write (stores, outputs) go to a scratch directory, not the checkout.
        cwd = os.getcwd()
        try:
            with tempfile.TemporaryDirectory() as scratch:
                os.chdir(scratch)
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(code, module.__dict__)
        finally:
            os.chdir(cwd)
            sys.modules["__main__"] = previous

"""The ``shoal`` command: ``run``, ``exec``, ``status``, ``results``, ``info`` (and ``demo``).

Built on click: subcommands, ``--help`` everywhere, ``--`` handling for ``exec`` and exit status
2 for usage errors come from it. Exit status: 0 when every item succeeded, 1 when some failed,
2 for usage errors (an unknown input extension, a ``MODULE:FUNCTION`` that does not import, a
store that cannot be opened), 130 after Ctrl-C. See ``docs/cli.md``.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from . import _inputs

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# -- records ------------------------------------------------------------------------------


def _jsonable(value: Any) -> tuple[bool, str]:
    try:
        return True, json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False, json.dumps(repr(value))


def record_line(index: int, ok: bool, value: Any) -> str:
    """One output line: ``{"index", "ok", "result"|"result_repr"|"error"}``."""
    if ok:
        fits, text = _jsonable(value)
        field = "result" if fits else "result_repr"
        return f'{{"index": {index}, "ok": true, "{field}": {text}}}'
    error = {"type": error_type(value), "message": error_message(value)}
    return json.dumps({"index": index, "ok": False, "error": error})


def error_type(exc: Any) -> str:
    from .._errors import RemoteError

    if isinstance(exc, RemoteError):
        return exc.type_name
    return type(exc).__name__


def error_message(exc: Any) -> str:
    from .._errors import RemoteError

    if isinstance(exc, RemoteError):
        return exc.message
    return str(exc)


# -- shared options -----------------------------------------------------------------------


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--store", "store", type=click.Path(dir_okay=False), default=None,
                     help="SQLite file keeping every result as it comes; a rerun resumes."),
        click.option("--workers", "-j", type=int, default=None,
                     help="Number of workers (default: the usable CPUs, see `shoal info`)."),
        click.option("--backend", default=None, help="processes (default), threads or serial."),
        click.option("--timeout", type=float, default=None,
                     help="Seconds one item may run; past it, it fails."),
        click.option("--retries", type=int, default=0,
                     help="Run an item that crashed or timed out up to N more times."),
        click.option("--capture", is_flag=True,
                     help="Keep each item's stdout and stderr (first and last 64 KiB)."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bar on stderr (default: on when stderr is a terminal)."),
        click.option("--quiet", "-q", is_flag=True, help="Print no result lines."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _execute(
    fn: Callable[..., Any],
    records: list[_inputs.Record | _inputs.BadRecord],
    *,
    args: tuple[Any, ...],
    store: str | None,
    workers: int | None,
    backend: str | None,
    timeout: float | None,
    retries: int,
    capture: bool,
    progress: bool | None,
    quiet: bool,
) -> int:
    """Run ``fn`` over the good records, print one line per record in input order."""
    from .. import _api, _driver
    from ..store import StoreError

    good = [i for i, r in enumerate(records) if not isinstance(r, _inputs.BadRecord)]
    positional = [records[i][0] for i in good]  # type: ignore[index]
    keywords = [records[i][1] for i in good]  # type: ignore[index]
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        call = _api.Prepared(
            "run", fn, (positional,), star=True, iterkwargs=keywords, args=args,
            on_error="return", timeout=timeout, retries=retries, progress=progress,
            store=store, capture=capture,
        )  # fmt: skip
        session, gen = call.open(_api._pool(workers, backend), ordered=True)
        if call.recorder is not None:
            call.recorder.positions = good
    except (StoreError, TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    stream = _driver.ResultStream(session, gen, call.recorder, with_index=True)
    failed = 0
    out = sys.stdout
    bad = (i for i, r in enumerate(records) if isinstance(r, _inputs.BadRecord))
    next_bad = next(bad, None)

    def emit(index: int, ok: bool, value: Any) -> None:
        if not quiet:
            out.write(record_line(index, ok, value) + "\n")

    def emit_bad_before(limit: int) -> int:
        nonlocal next_bad
        count = 0
        while next_bad is not None and next_bad < limit:
            rec = records[next_bad]
            assert isinstance(rec, _inputs.BadRecord)
            emit(next_bad, False, ValueError(rec.message))
            count += 1
            next_bad = next(bad, None)
        return count

    try:
        with stream:
            for position, value in stream:
                index = good[position]
                failed += emit_bad_before(index)
                ok = not isinstance(value, BaseException)
                failed += not ok
                emit(index, ok, value)
        failed += emit_bad_before(len(records))
    except KeyboardInterrupt:
        out.flush()
        click.echo("shoal: interrupted; finished results are kept", err=True)
        return EXIT_INTERRUPTED
    except StoreError as exc:
        out.flush()
        click.echo(f"shoal: {exc}", err=True)
        return EXIT_FAILED
    out.flush()
    return EXIT_FAILED if failed else EXIT_OK


def load_function(spec: str) -> Callable[..., Any]:
    """``MODULE:FUNCTION`` (the function may be dotted: ``mod:Class.method``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.UsageError(f"{spec!r} is not MODULE:FUNCTION (for example mypkg.sims:run)")
    # Like `python -m`: modules in the current directory can be named.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise click.UsageError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise click.UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise click.UsageError(f"{spec} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


# -- commands -----------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shoal", prog_name="shoal")
def cli() -> None:
    """Parallel map from the shell: run a Python function or a shell command on every input,
    on all usable cores, optionally into a resumable result store.

    \b
    Examples:
      shoal run sims:simulate params.jsonl --store sweep.sqlite > results.jsonl
      ls *.fastq | shoal exec --store qc.sqlite -- gzip -k {}
      shoal status sweep.sqlite
      shoal results sweep.sqlite --failed
    """


@cli.command()
@click.argument("function")
@click.argument("inputs")
@click.option("--format", "fmt", type=click.Choice(_inputs.FORMATS), default=None,
              help="Input format (default: from the extension; jsonl for -).")  # fmt: skip
@_run_options
def run(function: str, inputs: str, fmt: str | None, **options: Any) -> int:
    """Call MODULE:FUNCTION on every record of INPUTS, in parallel.

    INPUTS is a .jsonl file (a list per line is positional arguments, an object keyword
    arguments, anything else one argument), a .csv (the header names keyword arguments; values
    stay strings), a .txt (one string per line), or - for standard input (JSON lines unless
    --format says otherwise). Results go to standard output as JSON lines, in input order:
    {"index": i, "ok": true, "result": ...} or {"index": i, "ok": false, "error": {...}}.

    \b
    Examples:
      shoal run mymod:simulate params.jsonl
      shoal run mymod:simulate params.csv --store sweep.sqlite -j 16 --retries 2
      seq 10 | shoal run math:sqrt - --quiet --store roots.sqlite
    """
    try:
        fmt = _inputs.input_format(inputs, fmt)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    fn = load_function(function)
    records = _read(inputs, fmt)
    return _execute(fn, records, args=(), **options)


def _read(path: str, fmt: str) -> list[_inputs.Record | _inputs.BadRecord]:
    try:
        return list(_inputs.read_records(path, fmt))
    except OSError as exc:
        raise click.UsageError(f"cannot read inputs {path!r}: {exc}") from exc


class _ExecCommand(click.Command):
    """``exec`` needs its ``--``: without it, options of the command would be taken as ours."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--help" not in args and "-h" not in args and "--" not in args:
            raise click.UsageError(
                "shoal exec needs `--` before the command, e.g. shoal exec -- gzip {}", ctx
            )
        return super().parse_args(ctx, args)


@cli.command("exec", cls=_ExecCommand)
@click.option("--inputs", "-a", "inputs", default="-",
              help="File with one input per line (default: standard input).")  # fmt: skip
@_run_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def exec_(inputs: str, command: tuple[str, ...], **options: Any) -> int:
    """Run a shell command for every input line, GNU parallel-style.

    The words after -- form one command line, run with sh -c; {} is replaced by the
    shell-quoted line and {#} by its number (from 1). Without {}, the line is appended. Each
    command's exit status, stdout, stderr and duration are its result; a non-zero exit status
    fails the item.

    \b
    Examples:
      ls data/*.csv | shoal exec -- python analyse.py {}
      shoal exec --inputs samples.txt --store align.sqlite -j 8 -- 'bwa mem ref.fa {} > {}.sam'
      seq 100 | shoal exec -- echo job {#} of input {}
    """
    from ._exec import run_command

    template = " ".join(command).strip()
    if not template:
        raise click.UsageError("shoal exec: the command after -- is empty")
    records = _read(inputs, "txt")
    numbered = "{#}" in template
    lines: list[_inputs.Record | _inputs.BadRecord] = []
    for number, rec in enumerate(records, start=1):
        assert not isinstance(rec, _inputs.BadRecord)
        # The number is part of an item's identity only if the command uses it.
        lines.append(((rec[0][0], number if numbered else None), {}))
    return _execute(run_command, lines, args=(template,), **options)


def _open_store(path: str) -> Any:
    from ..store import Store, StoreError

    try:
        return Store(path)
    except StoreError as exc:
        raise click.UsageError(str(exc)) from exc


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.3g} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


@cli.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--errors", "max_errors", type=int, default=10, show_default=True,
              help="How many failures to list.")  # fmt: skip
def status(store: str, as_json: bool, max_errors: int) -> int:
    """Counts, failures, timings and, while a run goes on, an ETA.

    \b
    Examples:
      shoal status sweep.sqlite
      watch -n 10 shoal status sweep.sqlite
      shoal status sweep.sqlite --json | jq .pending
    """
    st = _open_store(store)
    with st:
        summary = st.summary()
        runs = st.runs()
        failures = [item for item in st.items() if item["status"] == "failed"]
    if as_json:
        click.echo(json.dumps(summary))
        return EXIT_OK
    last = runs[-1] if runs else {}
    click.echo(f"store: {store}")
    click.echo(f"function: {last.get('function', '-')}")
    state = "running" if summary["running"] else (last.get("status") or "-")
    click.echo(
        f"runs: {len(runs)} (last: {state}, started {_when(last.get('started'))} on "
        f"{last.get('host', '-')}, pid {last.get('pid', '-')})"
    )
    total = "unknown" if summary["total"] is None else summary["total"]
    pending = "-" if summary["pending"] is None else summary["pending"]
    click.echo(
        f"items: total {total}, done {summary['done']}, failed {summary['failed']}, "
        f"pending {pending}"
    )
    rate = summary["rate"]
    click.echo(
        f"time: elapsed {_seconds(summary['elapsed'])}, mean {_seconds(summary['mean_duration'])}"
        f" per item, rate {'-' if rate is None else f'{rate:.3g}'}/s"
        + (f", ETA {_seconds(summary['eta'])}" if summary["eta"] is not None else "")
    )
    if failures:
        click.echo(f"failures ({len(failures)}):")
        for item in failures[:max_errors]:
            err = item["error"]
            message = (err["message"] or "").splitlines()[0] if err["message"] else ""
            click.echo(f"  {item['key']}: {err['type']}: {message}")
        if len(failures) > max_errors:
            click.echo(f"  ... and {len(failures) - max_errors} more (shoal results --failed)")
    return EXIT_OK


@cli.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True, help="Output format.")  # fmt: skip
@click.option("--failed", is_flag=True, help="Only the failed items.")
def results(store: str, fmt: str, failed: bool) -> int:
    """Print the stored results, in input order, as `shoal run` prints them.

    The CSV has the columns index, ok, result (JSON) and error (TYPE: MESSAGE).

    \b
    Examples:
      shoal results sweep.sqlite > results.jsonl
      shoal results sweep.sqlite --format csv --failed
    """
    st = _open_store(store)
    with st:
        records = list(_stored_records(st, failed))
    if fmt == "jsonl":
        for index, ok, value in records:
            click.echo(record_line(index, ok, value))
        return EXIT_OK
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["index", "ok", "result", "error"])
    for index, ok, value in records:
        if ok:
            writer.writerow([index, "true", _jsonable(value)[1], ""])
        else:
            writer.writerow([index, "false", "", f"{error_type(value)}: {error_message(value)}"])
    return EXIT_OK


def _stored_records(st: Any, failed_only: bool) -> Iterator[tuple[int, bool, Any]]:
    done = {} if failed_only else dict(st.results())
    errors = dict(st.failures())
    for item in st.items():
        if item["status"] == "done" and not failed_only:
            yield item["index"], True, done[item["key"]]
        elif item["status"] == "failed":
            yield item["index"], False, errors[item["key"]]


@cli.command()
def info() -> int:
    """Version, usable CPUs and why, backends, MPI library, Slurm."""
    from ._info import info_lines

    for line in info_lines():
        click.echo(line)
    return EXIT_OK


@cli.command()
@click.option("--workers", type=int, default=None, help="Workers (default: all usable CPUs).")
@click.option("--scale", type=float, default=1.0, help="Work size factor.")
def demo(workers: int | None, scale: float) -> int:
    """Time real parallel work, serial versus shoal (what `make demo` runs)."""
    from .._demo import run as run_demo

    return EXIT_OK if run_demo(workers, scale) else EXIT_FAILED


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shoal`` console script and ``python -m shoal``.

    SIGTERM (what Slurm and most schedulers send first) is handled like Ctrl-C: finished
    results are committed and the exit status is 130. SIGINT is re-enabled even where the
    parent ignored it (a background job of a non-interactive shell).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupted)
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="shoal",
                        standalone_mode=False)  # fmt: skip
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("shoal: interrupted", err=True)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else EXIT_OK

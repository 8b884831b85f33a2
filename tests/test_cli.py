"""The ``shoal`` command, end to end in subprocesses (each with a hard ``timeout=``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import shoal

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}


def shoal_cmd(*args, stdin=None, cwd=None, timeout=90):
    return subprocess.run(
        [sys.executable, "-m", "shoal", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=timeout,
    )


def lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_run_jsonl_with_a_malformed_line_and_a_failure(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('1\n[2, 3]\n\n{"x": 3, "flag": "f"}\n{oops\n{"x": 4, "flag": "f"}\n')
    store = tmp_path / "s.sqlite"
    (tmp_path / "f").touch()
    res = shoal_cmd("run", "store_funcs:fails_when_flagged", inputs, "--store", store,
                    cwd=tmp_path)  # fmt: skip
    assert res.returncode == 1, res.stderr
    got = lines(res.stdout)
    assert [r["index"] for r in got] == [0, 1, 2, 3, 4]
    assert got[0] == {"index": 0, "ok": True, "result": 10}
    assert got[1]["result"] == 20  # fails_when_flagged(2, 3): no flag file named "3"
    assert got[2]["error"] == {"type": "ValueError", "message": "flagged 3"}
    assert got[3]["ok"] is False and "line 5" in got[3]["error"]["message"]
    assert got[4]["result"] == 40
    # The same records from the store, the same indices.
    res = shoal_cmd("results", store)
    assert res.returncode == 0
    stored = lines(res.stdout)
    assert [r["index"] for r in stored] == [0, 1, 2, 4] and stored[2] == got[2]
    res = shoal_cmd("results", store, "--format", "csv", "--failed")
    assert res.stdout.splitlines() == ["index,ok,result,error", "2,false,,ValueError: flagged 3"]
    res = shoal_cmd("status", store)
    assert res.returncode == 0 and "done 3, failed 1" in res.stdout
    assert "ValueError: flagged 3" in res.stdout
    summary = json.loads(shoal_cmd("status", store, "--json").stdout)
    assert summary["done"] == 3 and summary["total"] == 4


def test_run_csv_txt_and_stdin(tmp_path):
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("x,suffix\n1,?\n\n2,!\n")
    res = shoal_cmd("run", "store_funcs:text", csv_in)
    assert res.returncode == 0 and [r["result"] for r in lines(res.stdout)] == ["1?", "2!"]
    txt = tmp_path / "in.txt"
    txt.write_text("a\nb\n")
    res = shoal_cmd("run", "store_funcs:text", txt, "--backend", "threads")
    assert [r["result"] for r in lines(res.stdout)] == ["a!", "b!"]
    res = shoal_cmd("run", "store_funcs:triple", "-", stdin="1\n2\n")
    assert [r["result"] for r in lines(res.stdout)] == [3, 6]
    res = shoal_cmd("run", "store_funcs:unpicklable", "-", "--backend", "serial", stdin="1\n")
    assert lines(res.stdout)[0]["result_repr"].startswith("<unlocked _thread.lock")
    res = shoal_cmd("run", "store_funcs:triple", "-", "--quiet", stdin="1\n")
    assert res.returncode == 0 and res.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no_such_module:f", "x.jsonl"], "cannot import module"),
        (["run", "store_funcs:missing", "-"], "has no attribute"),
        (["run", "store_funcs:NOT_CALLABLE", "-"], "not a callable"),
        (["run", "store_funcs", "-"], "MODULE:FUNCTION"),
        (["run", "store_funcs:triple", "in.xlsx"], "extension"),
        (["run", "store_funcs:triple", "-", "--store", "/no/such/dir/s.sqlite"], "does not exist"),
        (["exec", "echo"], "needs `--`"),
        (["exec", "--"], "empty"),
        (["status", "missing.sqlite"], "does not exist"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    res = shoal_cmd(*args, stdin="1\n", cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr


def test_exec_runs_a_command_per_line_and_resumes(tmp_path):
    store = tmp_path / "e.sqlite"
    stdin = "a b\n\nc'd\n3\n"
    res = shoal_cmd("exec", "--store", store, "--", "echo", "{#}:{}", "&&", "test", "{}", "!=", "3",
                    stdin=stdin)  # fmt: skip
    assert res.returncode == 1, res.stderr
    got = lines(res.stdout)
    assert [r["ok"] for r in got] == [True, True, False]
    assert got[0]["result"]["stdout"] == "1:a b\n" and got[1]["result"]["stdout"] == "2:c'd\n"
    assert got[0]["result"]["returncode"] == 0 and got[0]["result"]["duration"] >= 0
    assert "exit status 1" in got[2]["error"]["message"]
    inputs = tmp_path / "lines.txt"
    inputs.write_text("x\n")
    res = shoal_cmd("exec", "--inputs", inputs, "--", "printf", "%s-")
    assert lines(res.stdout)[0]["result"]["stdout"] == "x-"  # without {}: appended
    with shoal.Store(store) as st:
        assert st.summary()["done"] == 2


def test_info_explains_the_cpu_count():
    res = shoal_cmd("info")
    assert res.returncode == 0
    assert f"CPUs: {shoal.cpu_count()} (affinity" in res.stdout
    for name in ("processes", "threads", "serial", "MPI:", "Slurm:"):
        assert name in res.stdout


def test_help_on_every_command_and_the_demo_subcommand():
    for command in ("run", "exec", "status", "results", "info", "demo"):
        res = shoal_cmd(command, "--help")
        assert res.returncode == 0 and "Usage: shoal" in res.stdout, command
    script = shutil.which("shoal", path=os.path.dirname(sys.executable))
    assert script is not None, "console script `shoal` not installed"
    res = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "exec" in res.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_exits_130_and_keeps_results(tmp_path, signum):
    store = tmp_path / "s.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "run", "store_funcs:slow", "-", "--store", str(store),
         "--workers", "2", "--quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write("".join(f"{i}\n" for i in range(400)))
    proc.stdin.close()
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if store.exists() and store.stat().st_size > 0:
                try:
                    with shoal.Store(store) as st:
                        if st.summary()["done"] >= 10:
                            break
                except shoal.StoreError:
                    pass
            time.sleep(0.05)
        proc.send_signal(signum)
        assert proc.stderr is not None
        proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    with shoal.Store(store) as st:
        assert st.summary()["done"] >= 10 and st.runs()[-1]["status"] == "interrupted"

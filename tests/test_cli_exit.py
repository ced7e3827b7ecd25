"""The process entry point ``llmtune.cli.run`` (console script, ``python -m llmtune``): after ``main`` returns it
ends the process with ``os._exit`` (no interpreter teardown), so these check what an ordinary exit guarantees
and a hard one could lose: the exit status, buffered stdout/stderr, ``atexit`` handlers, and a non-daemon
thread still running (then the ordinary exit, which waits for it). Each runs in a subprocess."""

import subprocess
import sys

import pytest


def _run(code: str, tmp_path):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_python_m_llmtune_prints_and_exits_with_the_commands_status(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "llmtune", "version"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("llmtune "), ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "llmtune", "nosuchcommand"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown command 'nosuchcommand'" in bad.stderr


@pytest.mark.parametrize("status", [0, 3])
def test_run_flushes_buffered_output_and_runs_atexit_handlers(tmp_path, status):
    marker = tmp_path / "atexit.txt"
    code = f"""
import atexit, sys, llmtune.cli as cli
def main():
    atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
    sys.stdout.write("x" * 100000 + "END")   # more than one buffer, the tail still buffered
    sys.stderr.write("to stderr")
    return {status}
cli.main = main
cli.run()
print("never reached")
"""
    out = _run(code, tmp_path)
    assert out.returncode == status
    assert out.stdout == "x" * 100000 + "END"
    assert out.stderr == "to stderr"
    assert marker.read_text() == "ran"


def test_run_waits_for_a_live_non_daemon_thread(tmp_path):
    marker = tmp_path / "thread.txt"
    code = f"""
import threading, time, llmtune.cli as cli
def late():
    time.sleep(0.5)
    open({str(marker)!r}, "w").write("done")
def main():
    threading.Thread(target=late).start()
    return 0
cli.main = main
cli.run()
"""
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "done"


def test_an_exception_out_of_main_takes_the_ordinary_exit(tmp_path):
    code = """
import llmtune.cli as cli
def main():
    raise RuntimeError("boom")
cli.main = main
cli.run()
"""
    out = _run(code, tmp_path)
    assert out.returncode == 1 and "RuntimeError: boom" in out.stderr


def test_run_freezes_a_commands_imports_for_the_collector_and_main_alone_does_not(tmp_path):
    # python -m llmtune <command>: the command's imports are made with the collector paused, then frozen
    # (gc.freeze; Python docs) and the collector is on again; cli.main() called from a notebook leaves it alone
    code = """
import gc, llmtune.cli as cli
def main():
    with cli._long_lived_imports():
        paused = not gc.isenabled()
        import json, email.parser
    print(paused, gc.isenabled(), gc.get_freeze_count() > 1000)
    return 0
cli.main = main
main()
cli.run()
"""
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False True False", "True True True"]

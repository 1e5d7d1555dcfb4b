"""Lines from concurrent processes arrive whole: each is one write() to the shared stream."""

import ast
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from splitrpc import console

LINES = 3000


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_a_line_is_one_write_with_its_newline():
    stream = Recorder()
    console.line("[server] pid 1 joined; 2 hospitals", stream)
    assert stream.writes == ["[server] pid 1 joined; 2 hospitals\n"]


def test_lines_of_concurrent_unbuffered_processes_never_merge():
    # Three writers share one pipe, as a run's processes share the launcher's stdout, and
    # are unbuffered (PYTHONUNBUFFERED, as under the test runner): each write() goes
    # straight to the pipe, so print()'s separate newline would let lines run together.
    writer = textwrap.dedent("""
        import sys
        from splitrpc import console
        for i in range(LINES):
            console.line(f"[{sys.argv[1]}] line {i}")
    """).replace("LINES", str(LINES))
    parent = f"""import subprocess, sys
procs = [subprocess.Popen([sys.executable, "-c", {writer!r}, tag]) for tag in "abc"]
sys.exit(max(p.wait() for p in procs))
"""
    result = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[-1] == ""
    bad = [line for line in lines[:-1] if not re.fullmatch(r"\[[abc]\] line \d+", line)]
    assert not bad, bad[:5]
    assert len(lines) - 1 == 3 * LINES


def test_the_package_prints_only_through_console_line():
    offenders = []
    for path in sorted((REPO / "splitrpc").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"print() splits a line into two writes under PYTHONUNBUFFERED: {offenders}"


@pytest.mark.distributed
def test_every_line_of_a_split_run_is_one_process_line(cli):
    result = cli("--method", "split", "--hospitals", 2, "--dataset", "synthetic", "--synthetic-train", 256,
                 "--synthetic-test", 64, "--model", "vgg11", "--width", 0.25, "--batch-size", 32, "--threads", 1,
                 "--max-steps", 4, "--log-every", 1)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    prefix = re.compile(r"\[(server|hospital\d+)\] ")
    assert all(prefix.match(line) and len(prefix.findall(line)) == 1 for line in lines), lines
    assert {"[server]", "[hospital1]", "[hospital2]"} <= {line.split(" ", 1)[0] for line in lines}

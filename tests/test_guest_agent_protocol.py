"""The in-guest agent's line protocol, run on the host (no guest, no VFIO needed)."""

from __future__ import annotations

import errno
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from guests.agent import READY_MARKER, Agent, serve


def _session(*lines: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    serve(io.StringIO("".join(line + "\n" for line in lines)), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_first_line_is_hello_then_one_reply_per_request_in_order() -> None:
    replies = _session('{"id": 1, "op": "hello"}', "", '{"id": 2, "op": "exit"}', '{"id": 3}')
    assert [r["id"] for r in replies] == [None, 1, 2]  # blank skipped; nothing after exit
    assert replies[0]["ok"] is True
    assert "release" in replies[0]["result"]


def test_bad_requests_get_error_replies_and_the_session_goes_on() -> None:
    replies = _session(
        "not json", "[1, 2]", '{"id": 7, "op": "nope"}', '{"id": 8, "op": "map"}', '{"id": 9}'
    )
    assert [r["ok"] for r in replies[1:]] == [False, False, False, False, False]
    assert "bad request" in replies[1]["error"]
    assert replies[3]["error"] == "unknown op 'nope'"
    assert replies[4]["id"] == 8  # missing arguments: a refusal, not a crash
    assert all(r["errno"] == 0 for r in replies[1:])


def test_os_errors_carry_the_errno_refusals_carry_zero() -> None:
    reply = Agent().handle({"id": 4, "op": "bind", "bdf": "0000:7f:1f.7-not-a-device"})
    assert (reply["ok"], reply["errno"]) == (False, errno.ENOENT)
    reply = Agent().handle({"id": 5, "op": "open_device", "group": 99, "bdf": "x"})
    assert (reply["ok"], reply["errno"]) == (False, 0)
    assert "not attached" in reply["error"]


def test_buffers_read_write_and_report_page_frames() -> None:
    agent = Agent()
    reply = agent.handle({"id": 1, "op": "alloc", "name": "b", "size": 8192})
    assert reply["ok"], reply
    assert agent.handle({"id": 2, "op": "write", "buffer": "b", "data": "cafe", "offset": 4096})[
        "ok"
    ]
    got = agent.handle({"id": 3, "op": "read", "buffer": "b", "offset": 4094, "size": 4})
    assert got["result"] == "0000cafe"
    bad = agent.handle({"id": 4, "op": "alloc", "name": "c", "size": 100})
    assert not bad["ok"]
    assert "multiple of 4 KiB" in bad["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hello(port: int) -> tuple[socket.socket, Any, dict[str, Any]]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = conn.makefile("rwb")
    return conn, f, json.loads(f.readline())


def test_pre_started_agent_forks_a_fresh_agent_per_connection() -> None:
    """guests/init's agent (listen): the ready marker once it listens, then each connection
    its own process and state, which ends with the connection."""
    port = _free_port()
    code = f"import agent; agent.listen({port})"
    here = Path(__file__).resolve().parent.parent / "guests"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(here)!r}); {code}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(READY_MARKER + " uptime=")
        a, fa, hello_a = _hello(port)
        b, fb, hello_b = _hello(port)
        assert hello_a["result"]["pid"] != hello_b["result"]["pid"] != proc.pid
        fa.write(b'{"id": 1, "op": "alloc", "name": "x", "size": 4096}\n')
        fa.flush()
        assert json.loads(fa.readline())["ok"]
        fb.write(b'{"id": 1, "op": "free", "name": "x"}\n')  # a's buffer is not b's
        fb.flush()
        assert not json.loads(fb.readline())["ok"]
        for conn, f in ((a, fa), (b, fb)):
            f.close()
            conn.close()
        deadline = time.monotonic() + 10
        while any(_alive(r["result"]["pid"]) for r in (hello_a, hello_b)):
            assert time.monotonic() < deadline, "a session's process outlived its connection"
            c, fc, _hello_c = _hello(port)  # the listener reaps ended sessions at each accept
            fc.close()
            c.close()
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False

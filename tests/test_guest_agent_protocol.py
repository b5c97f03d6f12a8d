"""The in-guest agent's line protocol, run on the host (no guest, no VFIO needed)."""

from __future__ import annotations

import errno
import io
import json
from typing import Any

from guests.agent import Agent, serve


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

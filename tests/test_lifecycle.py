"""Nothing leaks: every QEMU a case starts is gone after pass, failure, timeout, Ctrl-C and
even SIGKILL of the harness; artefacts stay for failures and go for passes.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.inner_run import alive, run_pytest, start_pytest, write_case

LAUNCH_AND_RECORD = """
    import os, asyncio
    from pathlib import Path
    from fixtures.qemu.spec import MachineSpec

    async def launched(launch):
        m = await launch(MachineSpec(accel="qtest"))
        Path("pid").write_text(f"{{m.pid}} {{m.runtime_dir}}")
        return m

    async def test_case(launch):
        m = await launched(launch)
        {body}
"""


def case(tmp_path: Path, body: str) -> Path:
    return write_case(tmp_path, LAUNCH_AND_RECORD.format(body=body))


def recorded(tmp_path: Path) -> tuple[int, Path]:
    pid, runtime = (tmp_path / "pid").read_text().split()
    return int(pid), Path(runtime)


def assert_gone(tmp_path: Path) -> None:
    pid, runtime = recorded(tmp_path)
    for _ in range(50):
        if not alive(pid):
            break
        time.sleep(0.1)
    assert not alive(pid), f"QEMU {pid} still running"
    assert not runtime.exists(), f"runtime directory {runtime} left behind"


def test_passing_case_leaves_nothing(tmp_path: Path, qemu_binary: str) -> None:
    code, out = run_pytest(case(tmp_path, "assert m.running"), "--qemu", qemu_binary)
    assert code == 0, out
    assert_gone(tmp_path)
    assert not any((tmp_path / "artefacts").glob("run-*/*")), "passing case kept artefacts"


def test_keep_artefacts_keeps_passing_case(tmp_path: Path, qemu_binary: str) -> None:
    code, out = run_pytest(
        case(tmp_path, "assert m.running"), "--qemu", qemu_binary, "--keep-artefacts"
    )
    assert code == 0, out
    kept = list((tmp_path / "artefacts").glob("run-*/*/qemu-0/qmp.log"))
    assert kept, out


def test_failing_case_leaves_no_qemu_and_keeps_artefacts(tmp_path: Path, qemu_binary: str) -> None:
    code, out = run_pytest(case(tmp_path, "assert False, 'boom'"), "--qemu", qemu_binary)
    assert code == 1, out
    assert_gone(tmp_path)
    test_dir = next((tmp_path / "artefacts").glob("run-*/*"))
    assert str(test_dir) in out, "failure report does not name the artefact directory"
    for name in ("qemu.stderr", "qmp.log", "cmdline", "qtest.log", "trace.log"):
        assert (test_dir / "qemu-0" / name).exists(), name
    assert "boom" in (test_dir / "failure.txt").read_text()
    assert (test_dir.stat().st_mode & 0o777) == 0o700


def test_timed_out_await_fails_cleanly(tmp_path: Path, qemu_binary: str) -> None:
    body = 'await m.wait_event("NEVER_SENT", timeout=0.3)'
    code, out = run_pytest(case(tmp_path, body), "--qemu", qemu_binary)
    assert code == 1, out
    assert "no QMP event NEVER_SENT within 0.3 s" in out
    assert_gone(tmp_path)


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Children started inside get SIGINT's default action. A shell without job control
    starts `cmd &` with SIGINT ignored (POSIX), and an ignored signal stays ignored across
    exec: a harness started from there, as by a CI script's background job, would never see
    the Ctrl-C this test sends, and sleep on past its timeout."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)  # reset to SIG_DFL by exec
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_harness_leaves_no_qemu(tmp_path: Path, qemu_binary: str, sig: int) -> None:
    with sigint_not_ignored():
        proc = start_pytest(case(tmp_path, "await asyncio.sleep(60)"), "--qemu", qemu_binary)
    try:
        for _ in range(200):
            if (tmp_path / "pid").exists() and (tmp_path / "pid").read_text():
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"inner case never launched QEMU: {proc.communicate()[0]}")
        pid, _ = recorded(tmp_path)
        assert alive(pid)
        proc.send_signal(sig)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for _ in range(50):
        if not alive(pid):
            break
        time.sleep(0.1)
    assert not alive(pid), f"QEMU {pid} outlived a harness stopped by {signal.Signals(sig).name}"
    # Whatever a killed harness could not remove, the next session sweeps.
    run_pytest(write_case(tmp_path, "def test_nothing(): pass"))
    assert not recorded(tmp_path)[1].exists(), "stale runtime directory survived the next run"


TWO_CASES = """
    from fixtures.qemu.spec import MachineSpec

    async def test_one(launch):
        await launch(MachineSpec(accel="qtest"))

    async def test_two(launch):
        await launch(MachineSpec(accel="qtest"))
"""


@pytest.mark.parametrize("qemu", ["none", "not-a-qemu"])
@pytest.mark.parametrize("workers", ["0", "2"])
def test_unusable_qemu_stops_the_run_with_one_line_serial_or_xdist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qemu: str, workers: str
) -> None:
    """No QEMU, or one that fails the capability probe: every worker stops with the reason and
    no verdict (exit 2), never an xdist INTERNALERROR for a worker that vanished mid-case."""
    monkeypatch.delenv("VIOMMU_QEMU", raising=False)
    args = ["-n", workers]
    reason = "no QEMU under test"
    if qemu == "not-a-qemu":
        fake = tmp_path / "qemu-system-x86_64"
        fake.write_text("#!/bin/sh\necho 'not a QEMU' >&2; exit 3\n")
        fake.chmod(0o755)
        args += ["--qemu", str(fake)]
        reason = "exited 3: not a QEMU"
    code, out = run_pytest(write_case(tmp_path, TWO_CASES), *args)
    assert code == 2, out
    assert "INTERNALERROR" not in out, out
    assert "Traceback" not in out, out
    assert "During handling" not in out, out
    # Serial pytest says "! Interrupted: ...", pytest-xdist "! xdist.dsession.Interrupted: ...".
    assert re.search(rf"^! (xdist\.dsession\.)?Interrupted: .*{reason}.* !$", out, re.M), out


def test_crash_in_an_interrupted_case_is_one_summary_line(tmp_path: Path, qemu_binary: str) -> None:
    """QEMU dies on its own while the case is being interrupted (ci/faults: a QEMU aborting as
    the interrupted case quit it): the run still ends as interrupted (exit 2) and the crash is
    one summary line, not a traceback out of pytest's session finish."""
    # SIGSEGV to QEMU (a crash: not the harness's kill), then Ctrl-C to the harness.
    body = "os.kill(m.pid, 11); await asyncio.sleep(0.5); os.kill(os.getpid(), 2); "
    body += "await asyncio.sleep(60)"
    with sigint_not_ignored():
        code, out = run_pytest(case(tmp_path, body), "--qemu", qemu_binary)
    assert code == 2, out
    assert "Traceback" not in out, out
    assert re.search(r"QEMU crashed in the interrupted case: .*signal SIGSEGV", out), out
    assert_gone(tmp_path)


def test_a_phase_cancelled_as_by_a_lost_interrupt_ends_the_session(
    tmp_path: Path, qemu_binary: str
) -> None:
    # What asyncio.Runner.run leaves of a Ctrl-C that lands between installing its SIGINT
    # handler and zeroing its interrupt count: the phase's task cancelled, CancelledError out.
    body = "asyncio.current_task().cancel()\n        await asyncio.sleep(0)"
    code, out = run_pytest(case(tmp_path, body), "--qemu", qemu_binary)
    assert code == 2, out  # interrupted, as Ctrl-C ends a session
    assert "KeyboardInterrupt" in out, out
    assert "Traceback" not in out, out
    assert "CancelledError" not in out, out
    assert_gone(tmp_path)

"""Fault campaign: break the harness's world mid-case and count what it leaves behind.

Usage: ci/faults [--trials N] [--seed S] [--short] [--faults K,...] [--output DIR] [--qemu PATH]
       ci/faults --rejudge --output DIR   (the verdicts again from a campaign's kept logs)

Every trial is one pytest session running one short case with one fault, seeded:

  qemu-sigkill-qtest  SIGKILL to QEMU at a random point of a qtest case
  qemu-sigkill-guest  the same during a guest case
  vfio-user-crash     the vfio-user server dies in the middle of its K-th reply (K random)
  vhost-user-crash    the vhost-user backend dies in the middle of its K-th reply
  ssh-drop            the SSH connection drops in the middle of the K-th agent call
  pytest-sigint       SIGINT to pytest at a random time while the case runs
  pytest-sigterm      SIGTERM to pytest at a random time while the case runs
  full-fs             the artefact directory is on a full filesystem (a tmpfs filled up)

The in-process hosts die through the harness's fault hooks (VIOMMU_FAULT, read once at import:
fixtures/vfio_user/session.py, fixtures/vhost_user/backend.py, fixtures/guest/session.py): the
part of the message that left before the crash is really on the socket, then every socket of the
host closes as a dead process's does. QEMU and pytest get real signals. Random times are drawn
over the span the first clean (calibration) run of the case measured, from the moment its QEMU
appears (before that the harness owns nothing that could leak) to the end of the session.

Each trial runs in a mount namespace of its own (unshare -m, root) where /tmp and /dev/shm are
empty private directories, so everything the trial creates there is its own, and every process
it starts carries a marker in its environment. After the trial:

  leaks    processes still alive with the marker (QEMU, ssh, a pytest that did not exit);
           sockets: socket files left in the trial's /tmp and /dev/shm, and socket fds the
           leaked processes hold; files: anything else left in the trial's /tmp and /dev/shm
           (runtime directories, guest RAM files, host socket directories); run directories:
           an artefact directory kept for a case that passed.
  clean    the report was one clear line: pytest exited by itself within the time limit with
           the status the fault calls for (1: a case failed; 2: interrupted; 0 only when the
           fault never landed, e.g. the signal came after the case ended: a signal to pytest
           sent while the case's QEMU ran must interrupt the session); nothing escaped
           the harness (no Python "Traceback (most recent call last)", INTERNALERROR,
           "Exception ignored", "Task was destroyed", "never retrieved", "never awaited",
           unraisable- or thread-exception warnings anywhere in the output); and the first
           short-summary lines of the case (FAILED/ERROR nodeid - message; pytest's
           KeyboardInterrupt line for a signal) include one that names the cause: it matches
           the fault's pattern (FAULTS below).

The table (stdout and OUTPUT/faults.md) has one row per fault: trials, landed (the fault hit
before the case ended), clean reports, leaks. Each trial's output, command and verdict stay
under OUTPUT/trial-NNN/. Exit 1 if any leak or unclear report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER_ENV = "VIOMMU_FAULT_TRIAL"
FAULT_ENV = "VIOMMU_FAULT"
QEMU_MACHINE = "qemu-machine"

Q_VFIO = "conformance/test_replay.py::test_device_in_other_domain_gets_nothing"
Q_VHOST = "conformance/test_vhost_user_notifiers.py::test_psi_of_another_domain_reaches_nothing"
GUEST = "conformance/test_guest_dma.py::test_type1_maps_reach_host_as_guest_intended[legacy]"

ESCAPED = re.compile(
    r"Traceback \(most recent call last\)|INTERNALERROR|Exception ignored|Task was destroyed"
    r"|was never retrieved|was never awaited|PytestUnraisableExceptionWarning"
    r"|PytestUnhandledThreadExceptionWarning|ResourceWarning"
)
SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+?)(?: - (.*))?$", re.M)
INTERRUPTED = re.compile(r"^!+ KeyboardInterrupt !+$", re.M)


@dataclass(frozen=True)
class Fault:
    name: str
    cases: tuple[str, ...]  # drawn in turn
    cause: str  # what the first summary line must name (a regular expression)
    signal: int | None = None  # sent at a random time ...
    target: str = ""  # ... to "qemu" or "pytest"
    hook: str = ""  # VIOMMU_FAULT kind, at a random message index
    full_fs: bool = False
    guest: bool = False


# A host crash is named by the host (its record is gone), or by QEMU's reaction to it: QEMU's
# own crash (a finding), its error line about the closed socket, or its refusal to start that
# names the device and the socket that failed.
CRASHED = (
    r"crashed in the middle of reply|QEMU exited .*signal SIGSEGV|server closed socket"
    r"|vfio-user-pci.*(socket|Broken pipe)|vhost-user.*(failed to init vhost_net|Failed to connect)"
    r"|Unable to write to socket: Broken pipe"
)
FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("qemu-sigkill-qtest", (Q_VFIO, Q_VHOST), r"SIGKILL", signal.SIGKILL, "qemu"),
        Fault("qemu-sigkill-guest", (GUEST,), r"SIGKILL", signal.SIGKILL, "qemu", guest=True),
        Fault("vfio-user-crash", (Q_VFIO,), CRASHED, hook="vfio-user-crash"),
        Fault("vhost-user-crash", (Q_VHOST,), CRASHED, hook="vhost-user-crash"),
        Fault("ssh-drop", (GUEST,), r"SSH connection dropped", hook="ssh-drop", guest=True),
        Fault("pytest-sigint", (Q_VFIO, Q_VHOST), r"KeyboardInterrupt", signal.SIGINT, "pytest"),
        Fault("pytest-sigterm", (Q_VFIO, Q_VHOST), r"KeyboardInterrupt", signal.SIGTERM, "pytest"),
        Fault("full-fs", (Q_VFIO, Q_VHOST), r"No space left on device", full_fs=True),
    )
}  # fmt: skip
# Shares of a full campaign (--trials N splits N in these proportions; guest trials cost 3x).
WEIGHTS = {
    "qemu-sigkill-qtest": 3, "qemu-sigkill-guest": 2, "vfio-user-crash": 3,
    "vhost-user-crash": 3, "ssh-drop": 2, "pytest-sigint": 3, "pytest-sigterm": 3, "full-fs": 1,
}  # fmt: skip
SHORT = ("qemu-sigkill-qtest", "vfio-user-crash", "vhost-user-crash", "pytest-sigint",
         "pytest-sigterm", "full-fs")  # fmt: skip


SHORT_HOOKS = ("vfio-user-crash", "vhost-user-crash", "ssh-drop")


class FaultsError(Exception):
    """The campaign cannot run; the message is the one line the user sees."""


@dataclass
class Calibration:
    """One clean run of a case: how long its parts take and how many messages flow."""

    case: str
    wall: float  # pytest start -> exit
    after_qemu: float  # first QEMU seen -> pytest exit
    qemu_life: float  # first QEMU seen -> last QEMU gone
    messages: dict[str, int] = field(default_factory=dict)  # hook kind -> count


@dataclass
class Trial:
    index: int
    fault: str
    case: str
    detail: str  # the fault's parameters: delay, message index
    rc: int | None = None
    seconds: float = 0.0
    landed: bool = False
    clean: bool = False
    why_unclear: str = ""
    summary: str = ""  # the line that names the cause
    mid_case: bool = False  # a signal went out while the case's QEMU was running
    leaks: dict[str, list[str]] = field(default_factory=dict)

    @property
    def leak_count(self) -> int:
        return sum(len(v) for v in self.leaks.values())


# ---- the trial's world ---------------------------------------------------------------------


@dataclass
class World:
    """A trial's private /tmp, /dev/shm and artefact directory, seen from outside."""

    root: Path
    shm: Path
    full_fs: bool

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def artefacts(self) -> Path:
        return self.root / "artefacts"

    def create(self) -> None:
        for d in (self.tmp, self.artefacts, self.shm):
            d.mkdir(parents=True, mode=0o700)
        (self.tmp).chmod(0o1777)
        for name in kept_in_tmp():
            (self.tmp / name).mkdir()  # the mount point of the real one, inside the namespace
        if self.full_fs:
            # A small tmpfs, then filled: every write in the artefact directory gets ENOSPC.
            _run(
                ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(self.artefacts)]
            )
            with (self.artefacts / "filler").open("wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError:
                    pass

    def destroy(self) -> None:
        if self.full_fs:
            subprocess.run(["umount", "-l", str(self.artefacts)], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)

    def command(self, pytest_cmd: list[str]) -> list[str]:
        """pytest in a mount namespace where /tmp and /dev/shm are this world's own (what the
        run itself lives in under /tmp, kept_in_tmp(), is bound into it first)."""
        keep = "".join(
            f"mount --bind /tmp/{shlex.quote(n)} {shlex.quote(str(self.tmp / n))} && "
            for n in kept_in_tmp()
        )
        script = (
            keep + 'mount --rbind "$1" /tmp && mount --bind "$2" /dev/shm && shift 2 && exec "$@"'
        )
        return [
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            str(self.tmp), str(self.shm), *pytest_cmd,
        ]  # fmt: skip


def kept_in_tmp() -> list[str]:
    """The entries of /tmp the trial's own run needs (the suite, its venv, QEMU, the guest
    image, the cache, when any lives under /tmp, as in a clone made there): a trial's private
    /tmp still shows them, and they are not its leftovers."""
    wanted = [ROOT, Path(sys.prefix)]
    wanted += [Path(v) for k in ("VIOMMU_CACHE", "VIOMMU_QEMU", "VIOMMU_GUEST_DIR")
               if (v := os.environ.get(k))]  # fmt: skip
    names = set()
    for path in wanted:
        parts = path.resolve().parts
        if len(parts) > 2 and parts[:2] == ("/", "tmp"):
            names.add(parts[2])
    return sorted(names)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise FaultsError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


# ---- processes -----------------------------------------------------------------------------


def marked_processes(token: str) -> dict[int, str]:
    """pid -> command name of every live process whose environment carries the marker (a
    QEMU running a machine, rather than a capability probe, is named "qemu-machine")."""
    needle = f"{MARKER_ENV}={token}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2 :].split()[0]
        if state in ("Z", "X"):
            continue  # exited; its parent reaps it (no resources held but a pid)
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        # The provisioned QEMU runs through its sysroot's ld.so: look at argv, not comm.
        with contextlib.suppress(OSError), open(f"/proc/{entry.name}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
            if any(b"qemu-system" in a for a in argv):
                machine = any(a.startswith(b"memory-backend-file") for a in argv)
                comm = QEMU_MACHINE if machine else "qemu-system (probe)"
        found[int(entry.name)] = comm
    return found


def socket_fds(pid: int) -> list[str]:
    out = []
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:"):
                out.append(f"pid {pid} fd {fd.name} {target}")
    except OSError:
        pass
    return out


# ---- one trial -----------------------------------------------------------------------------


class Runner:
    def __init__(self, qemu: str, out: Path, python: str, *, short: bool = False) -> None:
        self.qemu, self.out, self.python, self.short = qemu, out, python, short
        self.calibrations: dict[str, Calibration] = {}
        self.scratch = Path("/var/tmp") / f"vfaults-{os.getpid()}"
        self.shm_base = Path("/dev/shm")

    def pytest_cmd(self, case: str, artefacts: Path, *extra: str) -> list[str]:
        return [
            self.python, "-m", "pytest", case, "-q", "-rfE", "-p", "no:cacheprovider",
            f"--qemu={self.qemu}", f"--artefacts={artefacts}", *extra,
        ]  # fmt: skip

    def run(
        self,
        name: str,
        case: str,
        *,
        full_fs: bool = False,
        env_extra: dict[str, str] | None = None,
        keep: bool = False,
        action: Callable[[subprocess.Popen[bytes], float, dict[int, str]], bool] | None = None,
        limit: float = 300.0,
    ) -> tuple[int | None, str, dict[str, list[str]], dict[str, float], World]:
        """Run `case` in a fresh world; `action(proc, since_start, qemus)` is polled every
        5 ms while it runs (True: done with it). Returns rc (None: hung, killed), output,
        leaks, timings and the world (destroyed unless keep)."""
        token = uuid.uuid4().hex
        world = World(self.scratch / name, self.shm_base / f"vfaults-{os.getpid()}-{name}", full_fs)
        world.create()
        env = dict(os.environ, **{MARKER_ENV: token, "COLUMNS": "400"})
        env.pop(FAULT_ENV, None)  # only the trial's own fault, never one from outside
        env.update(env_extra or {})
        cmd = world.command(
            self.pytest_cmd(case, world.artefacts, *(["--keep-artefacts"] if keep else []))
        )
        log_path = self.out / f"{name}.log"
        t0 = time.monotonic()
        timings: dict[str, float] = {}
        rc: int | None
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            acting = action is not None
            try:
                while proc.poll() is None:
                    now = time.monotonic() - t0
                    if now > limit:
                        break
                    qemus = {p: c for p, c in marked_processes(token).items() if c == QEMU_MACHINE}
                    if qemus and "qemu_seen" not in timings:
                        timings["qemu_seen"] = now
                    if qemus:
                        timings["qemu_last"] = now
                    if acting and action is not None:
                        acting = not action(proc, now, qemus)
                    time.sleep(0.005)
            except BaseException:  # the campaign itself interrupted: nothing of it stays
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                world.destroy()
                raise
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            else:
                rc = proc.returncode
        timings["wall"] = time.monotonic() - t0
        output = log_path.read_text(errors="replace")
        leaks = self.leaks(token, world, rc if not keep else None)
        if not keep:
            world.destroy()
        return rc, output, leaks, timings, world

    def leaks(self, token: str, world: World, rc: int | None) -> dict[str, list[str]]:
        # PR_SET_PDEATHSIG and reaping take a moment: a leak is what is still there after 5 s.
        deadline = time.monotonic() + 5.0
        procs = marked_processes(token)
        while procs and time.monotonic() < deadline:
            time.sleep(0.1)
            procs = marked_processes(token)
        leaks: dict[str, list[str]] = {"processes": [], "sockets": [], "files": [], "run dirs": []}
        for pid, comm in procs.items():
            leaks["processes"].append(f"{comm} (pid {pid})")
            leaks["sockets"] += socket_fds(pid)
            with_kill(pid)
        kept = {world.tmp / name for name in kept_in_tmp()}
        for base in (world.tmp, world.shm):
            for path in sorted(base.rglob("*")):
                if path in kept:
                    continue
                rel = f"{'/tmp' if base == world.tmp else '/dev/shm'}/{path.relative_to(base)}"
                if path.is_socket():
                    leaks["sockets"].append(rel)
                elif path.parent == base or not path.is_dir():
                    leaks["files"].append(rel)
        # A failed or interrupted case keeps its artefacts on purpose; a passed one must not
        # (the session's own run-* directory stays: it is where every run's artefacts go).
        if rc == 0:
            for run in sorted(world.artefacts.glob("run-*")):
                leaks["run dirs"] += [str(p.relative_to(world.artefacts)) for p in run.iterdir()]
        return {k: v for k, v in leaks.items() if v}

    # ---- calibration ---------------------------------------------------------------------
    def calibrate(self, case: str) -> Calibration:
        if case in self.calibrations:
            return self.calibrations[case]
        if self.short:
            # No clean run first (time): early points only, which every short case reaches
            # (its first 20 replies; QEMU's first 50 ms: an idle machine runs a whole qtest
            # case's QEMU in about 0.1 s, so a later point often misses it).
            self.calibrations[case] = Calibration(
                case, 30.0, 0.05, 0.05, dict.fromkeys(SHORT_HOOKS, 21)
            )
            return self.calibrations[case]
        # A qtest case's QEMU may live for a tenth of a second: on a loaded machine the
        # 5 ms polling can miss it, so a clean run that saw no QEMU is tried again.
        for attempt in range(3):
            name = f"calibrate-{len(self.calibrations)}-{attempt}"
            rc, output, leaks, timings, world = self.run(name, case, keep=True)
            if rc != 0 or "qemu_seen" in timings:
                break
            world.destroy()
        try:
            if rc != 0 or "qemu_seen" not in timings:
                tail = output.strip().splitlines()[-1:] or ["no output"]
                raise FaultsError(f"clean run of {case} did not pass (rc {rc}): {tail[0]}")
            if leaks:
                raise FaultsError(f"clean run of {case} leaked: {json.dumps(leaks)}")
            messages = {
                "vfio-user-crash": _count(world.artefacts, "vfio-user-*.log", r"(\d+) messages"),
                "vhost-user-crash": _count(world.artefacts, "vhost-user-*.log", r"(\d+) messages"),
                "ssh-drop": _count(world.artefacts, "agent.log", r"^\S+ > ()"),
            }
        finally:
            world.destroy()
        cal = Calibration(
            case,
            wall=timings["wall"],
            after_qemu=timings["wall"] - timings["qemu_seen"],
            qemu_life=timings.get("qemu_last", timings["qemu_seen"]) - timings["qemu_seen"],
            messages=messages,
        )
        self.calibrations[case] = cal
        print(
            f"calibrated {case}: {cal.wall:.1f} s, QEMU for {cal.qemu_life:.1f} s, "
            f"messages {cal.messages}",
            flush=True,
        )
        return cal

    # ---- a fault trial -------------------------------------------------------------------
    def trial(self, index: int, fault: Fault, case: str, rng: random.Random) -> Trial:
        cal = self.calibrate(case)
        env: dict[str, str] = {}
        action = None
        mid_case: list[bool] = []
        if fault.hook:
            total = cal.messages.get(fault.hook, 0)
            if total < 2:
                raise FaultsError(f"{case} exchanges no {fault.hook} messages to break")
            # The last message or two belong to QEMU's quit: aim inside the case.
            at = rng.randint(1, max(1, total - 1))
            fraction = rng.uniform(0.05, 0.95)
            env[FAULT_ENV] = f"{fault.hook}:{at}:{fraction:.3f}"
            detail = f"{FAULT_ENV}={env[FAULT_ENV]} (of ~{total})"
        elif fault.signal is not None:
            # QEMU: over its life. pytest: over QEMU's life (the case) and 0.2 s beyond (its
            # teardown, the session's end); later is a plain pass anyway.
            span = cal.qemu_life + (0.2 if fault.target == "pytest" else 0.0)
            delay = rng.uniform(0.0, span)
            sig = signal.Signals(fault.signal).name
            detail = f"{sig} to {fault.target} {delay:.2f} s after QEMU appeared"
            action = _signaller(fault, delay, mid_case)
        else:
            detail = "artefact directory on a full 256 KiB tmpfs"
        name = f"trial-{index:03d}"
        trial = Trial(index, fault.name, case, detail)
        limit = 3 * cal.wall + 60.0
        rc, output, leaks, timings, _ = self.run(
            name, case, full_fs=fault.full_fs, env_extra=env, action=action, limit=limit
        )
        trial.rc, trial.seconds, trial.leaks = rc, timings["wall"], leaks
        trial.mid_case = bool(mid_case and mid_case[0])
        judge(trial, fault, output)
        (self.out / f"{name}.json").write_text(json.dumps(asdict(trial), indent=1) + "\n")
        return trial


def with_kill(pid: int) -> None:
    """A leaked process is counted, then removed so the next trial starts clean."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _count(artefacts: Path, pattern: str, regex: str) -> int:
    total = 0
    for path in artefacts.rglob(pattern):
        text = path.read_text(errors="replace")
        found = re.findall(regex, text, re.M)
        total += sum(int(n) for n in found) if found and found[0] else len(found)
    return total


def _signaller(
    fault: Fault, delay: float, sent_mid_case: list[bool]
) -> Callable[[subprocess.Popen[bytes], float, dict[int, str]], bool]:
    """Send the fault's signal `delay` s after QEMU appears; `sent_mid_case` gets whether a
    machine's QEMU was still running at that moment."""
    state: dict[str, float] = {}

    def act(proc: subprocess.Popen[bytes], now: float, qemus: dict[int, str]) -> bool:
        if "since" not in state:
            if not qemus:
                return False
            state["since"] = now
        if now - state["since"] < delay:
            return False
        assert fault.signal is not None
        targets = [proc.pid] if fault.target == "pytest" else list(qemus)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, fault.signal)
        sent_mid_case.append(bool(qemus))
        return True

    return act


def judge(trial: Trial, fault: Fault, output: str) -> None:
    """Did the fault land, and was the report one clear line (see the module docstring)?"""
    interrupted = INTERRUPTED.search(output)
    # The harness's own word that the signal came once every case was over (the polling
    # may still have seen QEMU just before it exited).
    late = "while writing the final report" in output
    summaries = [m for m in SUMMARY.finditer(output)]
    trial.landed = trial.rc != 0
    problems = []
    if trial.rc is None:
        problems.append("pytest hung (killed at the time limit)")
    elif trial.rc == 0 and fault.target == "pytest" and trial.mid_case and not late:
        trial.landed = True
        problems.append("interrupt lost: sent while the case ran, and the session passed")
    elif trial.rc == 0:
        pass  # the fault came after the case was over: a plain pass is the right report
    elif fault.signal is not None and fault.target == "pytest":
        if trial.rc != 2:
            problems.append(f"exit status {trial.rc}, not 2 (interrupted)")
        if interrupted is None:
            problems.append("no KeyboardInterrupt line")
        else:
            trial.summary = interrupted.group(0)
    else:
        if trial.rc != 1:
            problems.append(f"exit status {trial.rc}, not 1 (a case failed)")
        naming = [m for m in summaries if re.search(fault.cause, m.group(3) or "")]
        if not summaries:
            problems.append("no FAILED/ERROR summary line")
        elif not naming:
            trial.summary = summaries[0].group(0)
            problems.append(f"no summary line names the cause /{fault.cause}/")
        else:
            trial.summary = naming[0].group(0)
    if escaped := ESCAPED.search(output):
        problems.append(f"escaped the harness: {escaped.group(0)!r}")
    trial.clean = not problems
    trial.why_unclear = "; ".join(problems)


# ---- the campaign --------------------------------------------------------------------------


def plan(names: list[str], trials: int, rng: random.Random) -> list[tuple[str, int]]:
    """(fault, turn) for `trials` trials split over `names` by WEIGHTS, shuffled."""
    weights = {n: WEIGHTS[n] for n in names}
    total = sum(weights.values())
    counts = {n: max(1, round(trials * w / total)) for n, w in weights.items()}
    while sum(counts.values()) > trials and max(counts.values()) > 1:
        counts[max(counts, key=lambda n: counts[n])] -= 1
    while sum(counts.values()) < trials:
        counts[min(counts, key=lambda n: counts[n] / weights[n])] += 1
    order = [(n, turn) for n, c in counts.items() for turn in range(c)]
    rng.shuffle(order)
    return order


def table(trials: list[Trial]) -> str:
    lines = [
        "| fault | trials | landed | clean reports | leaks |",
        "|---|---|---|---|---|",
    ]
    for name in FAULTS:
        mine = [t for t in trials if t.fault == name]
        if not mine:
            continue
        kinds: dict[str, int] = {}
        for t in mine:
            for kind, items in t.leaks.items():
                kinds[kind] = kinds.get(kind, 0) + len(items)
        leak_text = str(sum(kinds.values())) + (
            " (" + ", ".join(f"{k} {n}" for k, n in kinds.items()) + ")" if kinds else ""
        )
        clean = sum(t.clean for t in mine)
        lines.append(
            f"| {name} | {len(mine)} | {sum(t.landed for t in mine)} | "
            f"{clean} ({100 * clean // len(mine)} %) | {leak_text} |"
        )
    clean = sum(t.clean for t in trials)
    leaks = sum(t.leak_count for t in trials)
    if trials:
        lines.append(
            f"| **all** | {len(trials)} | {sum(t.landed for t in trials)} | "
            f"{clean} ({100 * clean // len(trials)} %) | {leaks} |"
        )
    bad = [t for t in trials if not t.clean or t.leaks]
    if bad:
        lines += ["", "Unclear reports and leaks:"]
        for t in bad:
            what = [t.why_unclear] if not t.clean else []
            what += [f"{k}: {', '.join(v[:3])}" for k, v in t.leaks.items()]
            lines.append(f"- trial {t.index:03d} {t.fault} ({t.detail}): {'; '.join(what)}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ci/faults", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None, help="default 200 (--short: 6)")
    parser.add_argument(
        "--rejudge", action="store_true", help="verdicts again from --output's trial logs, no runs"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--short",
        action="store_true",
        help="one trial of each qtest-tier fault, early fault points, no calibration runs",
    )
    parser.add_argument(
        "--faults", default=None, help=f"comma-separated subset of {','.join(FAULTS)}"
    )
    parser.add_argument("--output", type=Path, default=None, help="default artefacts/faults-<time>")
    parser.add_argument("--qemu", default=os.environ.get("VIOMMU_QEMU"), help="QEMU under test")
    args = parser.parse_args(argv)
    names = list(SHORT if args.short else FAULTS)
    if args.faults:
        names = [n.strip() for n in args.faults.split(",") if n.strip()]
        if unknown := [n for n in names if n not in FAULTS]:
            parser.error(f"unknown fault {unknown[0]!r} (known: {', '.join(FAULTS)})")
    args.names = names
    if args.rejudge:
        if args.output is None or not args.output.is_dir():
            parser.error("--rejudge needs --output DIR (a campaign's output directory)")
        return args
    if args.trials is None:
        args.trials = len(names) if args.short else 200
    if args.trials < len(names):
        parser.error(f"--trials {args.trials}: at least one per fault ({len(names)})")
    if not args.qemu or not os.access(args.qemu, os.X_OK):
        parser.error(f"--qemu {args.qemu}: not an executable QEMU (ci/faults provisions one)")
    if any(FAULTS[n].guest for n in names) and not os.environ.get("VIOMMU_GUEST_DIR"):
        parser.error("guest faults need the guest image: run through ci/faults (VIOMMU_GUEST_DIR)")
    return args


def rejudge(out: Path) -> list[Trial]:
    """The verdicts of a finished campaign again, from its kept trial logs, with this file's
    cause patterns (the leaks are what the trial counted; they cannot be counted again)."""
    trials = []
    for record in sorted(out.glob("trial-[0-9][0-9][0-9].json")):
        trial = Trial(**json.loads(record.read_text()))
        judge(trial, FAULTS[trial.fault], record.with_suffix(".log").read_text(errors="replace"))
        record.write_text(json.dumps(asdict(trial), indent=1) + "\n")
        trials.append(trial)
    return trials


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.rejudge:
        judged = rejudge(args.output)
        text = table(judged)
        (args.output / "faults.md").write_text(text)
        print(f"re-judged {len(judged)} trials in {args.output}\n{text}", end="")
        return 0 if judged and all(t.clean and not t.leaks for t in judged) else 1
    if os.geteuid() != 0:
        print("ci/faults: needs root (a mount namespace per trial, a tmpfs for full-fs)",
              file=sys.stderr)  # fmt: skip
        return 2
    out = args.output or ROOT / "artefacts" / f"faults-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rng = random.Random(args.seed)
    runner = Runner(args.qemu, out, sys.executable, short=args.short)
    trials: list[Trial] = []
    started = time.monotonic()
    try:
        for index, (name, turn) in enumerate(plan(args.names, args.trials, rng)):
            fault = FAULTS[name]
            case = fault.cases[turn % len(fault.cases)]
            trial = runner.trial(index, fault, case, rng)
            trials.append(trial)
            verdict = "clean" if trial.clean else f"UNCLEAR: {trial.why_unclear}"
            leaks = f"; LEAKS {json.dumps(trial.leaks)}" if trial.leaks else ""
            print(
                f"{index:03d} {name:19} rc {trial.rc} {trial.seconds:5.1f} s "
                f"{'landed' if trial.landed else 'missed'} {verdict}{leaks} [{trial.detail}]",
                flush=True,
            )
            (out / "faults.md").write_text(table(trials))
    except KeyboardInterrupt:
        print("ci/faults: interrupted; the table covers the finished trials", file=sys.stderr)
    except FaultsError as err:
        print(f"ci/faults: {err}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(runner.scratch, ignore_errors=True)
    text = table(trials)
    (out / "faults.md").write_text(text)
    print(
        f"\nci/faults --trials {args.trials} --seed {args.seed}"
        f"{' --short' if args.short else ''}: {time.monotonic() - started:.0f} s\n{text}"
        f"trial logs in {out}"
    )
    return 0 if trials and all(t.clean and not t.leaks for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())

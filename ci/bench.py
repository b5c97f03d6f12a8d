"""Benchmarks of the suite, printed one figure per line as `name: value`.

Wall-clock figures on a noisy machine mean little alone, so each case time is also reported
as a ratio to a bare QEMU start+quit measured in the same run, and every figure but the
guest tier's and ci_test_s is the median of --runs.
Usage: ci/bench [--runs N] [--fuzz-examples N] [--skip-guest] [--skip-ci-test]
(--skip-guest also skips the two guest-tier runs, guest_tier_s and guest_tier_fresh_s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ci.guest_bench import guest_bench  # noqa: E402
from ci.vtd_fuzz_bench import measure_fuzz_ops_per_s  # noqa: E402

QTEST_CASE = "conformance/test_vtd_registers.py::test_te_enable_keeps_other_persistent_bits"
# A short case with one vfio-user device: host start, QEMU's realize handshake with it, the
# firmware's PCI set-up and the VT-d driver's init come on top of the QEMU start.
QTEST_DEVICE_CASE = (
    "conformance/test_replay.py::test_enabling_dmar_after_mappings_exist_replays_them"
)
CI_TEST_TIMEOUT_S = 3600
# pytest's last line, e.g. "=== 690 passed, 3 skipped, 32 xfailed in 301.2s (0:05:01) ===".
SUMMARY_LINE = re.compile(r"^=+ (.*\b(passed|failed|error|errors)\b.*) in [0-9.]+s.*=+$")


def bare_qemu_start_quit(qemu: str) -> float:
    """QEMU with the same machine as a qtest case, up to QMP and straight out again."""
    args = [
        qemu, "-machine", "q35", "-accel", "qtest", "-qtest", "null", "-qtest-log", "/dev/null",
        "-nodefaults", "-display", "none", "-device", "intel-iommu,caching-mode=on",
        "-qmp", "stdio",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(
        args,
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return time.perf_counter() - start


def pytest_case_seconds(nodeid: str, qemu: str, *extra: str) -> float:
    """Set-up + call + teardown of one case, as pytest's JUnit report times it."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", nodeid, "--qemu", qemu,
             f"--junitxml={report}", "-o", "junit_duration_report=total", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"bench: {nodeid} failed:\n{proc.stdout[-2000:]}")
        case = ET.parse(report).getroot().find(".//testcase")
        assert case is not None
        return float(case.get("time", "nan"))


def ci_test_seconds(qemu: str, log: Path) -> tuple[float, str]:
    """Wall time of one whole ci/test (lint, type check, every test, as CI runs it) and its
    pytest summary; its output goes to `log`. A failing run is no figure: SystemExit."""
    start = time.perf_counter()
    with log.open("wb") as sink:
        try:
            code = subprocess.run(
                [str(ROOT / "ci" / "test"), f"--qemu={qemu}"], cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=sink, stderr=subprocess.STDOUT, timeout=CI_TEST_TIMEOUT_S, check=False,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            raise SystemExit(f"bench: ci/test ran over {CI_TEST_TIMEOUT_S} s ({log})") from None
    seconds = time.perf_counter() - start
    lines = log.read_text(errors="replace").splitlines()
    summary = next((m.group(1) for m in map(SUMMARY_LINE.match, reversed(lines)) if m), "")
    if code != 0:
        raise SystemExit(f"bench: ci/test exited {code}: {summary or lines[-1:]} (log: {log})")
    return seconds, summary


def guest_tier_seconds(qemu: str, *, reuse: bool) -> float:
    """Wall time of the guest tier (`-m guest`) on ci/test's worker count; `reuse=False`
    boots a guest for every case (VIOMMU_GUEST_REUSE=0) instead of sharing them."""
    cores = os.cpu_count() or 1
    workers = "0" if cores < 2 else str(min(cores, 4))
    env = {**os.environ, "VIOMMU_GUEST_REUSE": "1" if reuse else "0"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "conformance", "-m", "guest", "-n", workers,
         "--qemu", qemu],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=CI_TEST_TIMEOUT_S, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stdout.strip().splitlines()[-1:]
        raise SystemExit(f"bench: the guest tier (reuse={reuse}) failed: {tail}")
    return seconds


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--qemu", default=os.environ.get("VIOMMU_QEMU"))
    parser.add_argument("--fuzz-examples", type=int, default=20)
    parser.add_argument("--skip-guest", action="store_true", help="no guest-tier figures")
    parser.add_argument(
        "--skip-ci-test", action="store_true", help="no ci_test_s (one whole ci/test run: minutes)"
    )
    opts = parser.parse_args()
    if not opts.qemu:
        raise SystemExit("bench: no QEMU (pass --qemu or run through ci/bench)")
    figures: list[tuple[str, str]] = []
    bare = median([bare_qemu_start_quit(opts.qemu) for _ in range(opts.runs)])
    case = median([pytest_case_seconds(QTEST_CASE, opts.qemu) for _ in range(opts.runs)])
    device = median([pytest_case_seconds(QTEST_DEVICE_CASE, opts.qemu) for _ in range(opts.runs)])
    figures += [
        ("bare_qemu_start_quit_s", f"{bare:.3f}"),
        ("qtest_case_s", f"{case:.3f}"),
        ("qtest_case_over_bare", f"{case / bare:.2f}"),
        ("qtest_device_case_s", f"{device:.3f}"),
        ("qtest_device_case_over_bare", f"{device / bare:.2f}"),
    ]
    for name, value in figures:
        print(f"{name}: {value}", flush=True)
    # The run with the median rate, of --runs (one run of the same program varies by a third).
    examples = opts.fuzz_examples
    runs = [measure_fuzz_ops_per_s(opts.qemu, examples=examples) for _ in range(opts.runs)]
    fuzz = sorted(runs, key=lambda r: float(r["fuzz_ops_per_s"]))[len(runs) // 2]
    print(f"fuzz_ops_per_s: {fuzz['fuzz_ops_per_s']:.1f}", flush=True)
    # The stateful machine's own count and clock (QEMU start-up per example included).
    per_min = 60.0 * fuzz["examples"] / fuzz["seconds"] if fuzz["seconds"] else float("nan")
    print(f"stateful_examples_per_min: {per_min:.1f}", flush=True)
    if not opts.skip_guest:
        guest = asyncio.run(guest_bench(opts.qemu, boots=opts.runs))
        print(f"guest_boot_s: {guest['guest_boot_s']:.2f}")
        print(f"guest_boot_over_bare: {guest['guest_boot_s'] / bare:.1f}")
        print(f"agent_map_unmap_per_s: {guest['agent_map_unmap_per_s']:.1f}")
        print(f"guest_map_unmap_per_s: {guest['guest_map_unmap_per_s']:.1f}", flush=True)
        # Shared guests (fixtures/rig/guest_pool.py) against a boot per case, back to back.
        shared = guest_tier_seconds(opts.qemu, reuse=True)
        fresh = guest_tier_seconds(opts.qemu, reuse=False)
        print(f"guest_tier_s: {shared:.1f}")
        print(f"guest_tier_fresh_s: {fresh:.1f}")
        print(f"guest_tier_over_fresh: {shared / fresh:.2f}", flush=True)
    if not opts.skip_ci_test:
        # Last, so that the figures above are not taken beside it; the log outlives the run.
        log = Path(tempfile.mkstemp(prefix="bench-ci-test-", suffix=".log")[1])
        seconds, summary = ci_test_seconds(opts.qemu, log)
        print(f"ci_test_s: {seconds:.1f}")
        print(f"ci_test_summary: {summary} (log: {log})", flush=True)


if __name__ == "__main__":
    main()

"""fuzz_ops_per_s for ci/bench: verified invalidation operations per second of the stateful
machine (conformance/test_stateful.py), measured by one pytest run of that case.

    from ci.vtd_fuzz_bench import measure_fuzz_ops_per_s
    record = measure_fuzz_ops_per_s(qemu, examples=20)
    print(f"fuzz_ops_per_s: {record['fuzz_ops_per_s']}")

`record` is {"ops", "steps", "examples", "seconds", "fuzz_ops_per_s", "fresh_qemus",
"reused_qemus", "reset_fallbacks", "coverage"}: ops are invalidation descriptors whose step
passed the host-vs-oracle check; seconds is the machine's whole run, QEMU start-ups and the
checked resets between examples included (what a user waits for); fresh / reused / fallbacks
count the examples that ran on a QEMU of their own, on a reset QEMU, and resets that did not
check out (fixtures/rig/reset.py); coverage counts the steps per table-space feature that
passed (the case's summary, FEATURES in the case). reuse=False (`--fresh` on the command line)
starts a fresh QEMU for every example (VIOMMU_RIG_REUSE=0), for comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from fixtures import HarnessError

CASE = "conformance/test_stateful.py::test_random_driver_sequences_keep_host_equal_to_tables"
TIMEOUT_S = 900


class FuzzBenchError(HarnessError):
    """The stateful machine did not finish, failed, or wrote no statistics."""


def measure_fuzz_ops_per_s(
    qemu: str,
    *,
    examples: int = 20,
    python: str = sys.executable,
    repo: Path | None = None,
    timeout: float = TIMEOUT_S,
    reuse: bool = True,
) -> dict[str, Any]:
    root = repo or Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="fuzz-bench-") as tmp:
        stats = Path(tmp) / "stats.json"
        env = dict(os.environ, VIOMMU_FUZZ_STATS=str(stats))
        if not reuse:
            env["VIOMMU_RIG_REUSE"] = "0"
        cmd = [
            python,
            "-m",
            "pytest",
            CASE,
            "-q",
            f"--qemu={qemu}",
            f"--fuzz-examples={examples}",
            "--hypothesis-seed=1",  # the same programs every run: figures compare across runs
            f"--artefacts={tmp}/artefacts",
        ]
        try:
            done = subprocess.run(
                cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as err:
            raise FuzzBenchError(f"stateful machine ran over {timeout:.0f} s") from err
        if done.returncode != 0 or not stats.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise FuzzBenchError("stateful machine failed:\n" + "\n".join(tail))
        return cast("dict[str, Any]", json.loads(stats.read_text()))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--fresh"]
    result = measure_fuzz_ops_per_s(
        args[0], examples=int(args[1]) if args[1:] else 20, reuse="--fresh" not in sys.argv
    )
    coverage = result.pop("coverage", {})
    print(f"fuzz_ops_per_s: {result['fuzz_ops_per_s']} {json.dumps(result)}")
    print(f"fuzz_features_covered: {sum(1 for n in coverage.values() if n)}")

"""ci/mutation's pure parts: where functions are, which lines a range changes, mutant
generation restricted to lines, and the report's arithmetic. A real campaign builds QEMU
(`ci/mutation --qemu-src TREE`), which ci/test does not do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from ci.mutation import (
    Mutant,
    Triage,
    changed_lines,
    function_ranges,
    generate,
    parse_functions,
    report,
)
from tests.fake_toolchain import fake_toolchain

ROOT = Path(__file__).resolve().parent.parent

C_SOURCE = textwrap.dedent(
    """\
    static int vtd_helper(int a);

    static int vtd_page_walk_one(IOMMUTLBEvent *event,
                                 vtd_page_walk_info *info)
    {
        if (info->aw > 0) {
            return 1;
        }
        return 0;
    }

    void memory_region_notify_iommu(int x)
    {
        int y = x + 1;
    }
    """
)


def test_function_ranges_cover_the_body_only_of_definitions() -> None:
    ranges = function_ranges(C_SOURCE, ("vtd_page_walk_one", "memory_region_notify_iommu",
                                        "vtd_helper"))  # fmt: skip
    assert ranges == {
        "vtd_page_walk_one": range(5, 11),
        "memory_region_notify_iommu": range(13, 16),
    }


def test_changed_lines_of_a_commit_range(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.invalid")
    git("config", "user.name", "t")
    (tmp_path / "a.c").write_text(C_SOURCE)
    git("add", "a.c")
    git("commit", "-qm", "base")
    (tmp_path / "a.c").write_text(C_SOURCE.replace("return 1;", "return 2;\n        return 3;"))
    git("commit", "-qam", "change")
    assert changed_lines(tmp_path, "HEAD~1..HEAD", "a.c") == {7, 8}


def test_mutants_only_on_the_chosen_lines(tmp_path: Path) -> None:
    (tmp_path / "hw").mkdir()
    (tmp_path / "hw" / "x.c").write_text(C_SOURCE)
    lines = {n: "vtd_page_walk_one" for n in range(6, 7)}  # the `if` line alone
    mutants = generate(tmp_path, "hw/x.c", lines, tmp_path / "out")
    assert mutants, "universalmutator made no mutant of an if condition"
    assert {m.line for m in mutants} == {6}
    assert all(m.original == "    if (info->aw > 0) {" != m.mutated for m in mutants)
    assert len({m.key for m in mutants}) == len(mutants)


def test_report_scores_killed_and_timeouts_against_survivors() -> None:
    def mutant(key: str, function: str) -> Mutant:
        return Mutant(key, "hw/x.c", function, 1, "a", f"b{key}", "")

    mutants = [mutant("k", "f"), mutant("t", "f"), mutant("s", "f"), mutant("b", "g")]
    results: dict[str, dict[str, object]] = {
        "k": {"status": "killed"},
        "t": {"status": "timeout"},
        "s": {"status": "survived"},
        "b": {"status": "build failed"},
    }
    text = report(mutants, results, "meta", {})
    assert "| hw/x.c | 1 | 1 | 1 | 0 | 0 | 1 | 67% |" in text
    assert "| hw/x.c:g | 0 | 0 | 0 | 0 | 0 | 1 | - |" in text
    assert "## Survivors (1)" in text
    assert "-a\n+bs" in text


def test_parse_functions_keeps_each_function_with_its_file() -> None:
    picked = parse_functions("vfio_iommu_map_notify,vtd_iommu_replay")
    assert picked == {
        "hw/i386/intel_iommu.c": ("vtd_iommu_replay",),
        "hw/vfio/listener.c": ("vfio_iommu_map_notify",),
    }


# --- a whole campaign on a fake tree ------------------------------------------------------
# The "QEMU" built from the fake tree is a script that prints its intel_iommu.c; the "suite" is
# one test that reads it. Mutants of the guard line are killed, a mutant that makes the suite
# hang times out, deleting the fallback return breaks the build, and a mutant of the comment-
# free constant survives. configure/ninja/pkg-config are fakes on PATH, so this runs anywhere.

FAKE_SOURCE = """\
static int vtd_iommu_replay(int x)
{
    if (x > 0) {
        return 7;
    }
    return 0;
}
"""
FAKE_CONFIGURE = """\
#!/bin/sh
if [ "$1" = --help ]; then exit 0; fi
src=$(cd "$(dirname "$0")" && pwd)
echo "$src" > src
mkdir -p pc-bios
for f in bios-256k.bin kvmvapic.bin linuxboot_dma.bin; do : > pc-bios/$f; done
echo "# fake" > build.ninja
"""
FAKE_NINJA = """\
#!/bin/sh
# ninja -C DIR -jN TARGET: "compile" intel_iommu.c into a script that prints it.
src=$(cat "$2/src")
grep -q "return 0;" "$src/hw/i386/intel_iommu.c" ||
  { echo "x.c:6:5: error: missing return"; exit 1; }
cp "$src/hw/i386/intel_iommu.c" "$2/source.c"
printf '#!/bin/sh\\ncat "%s/source.c"\\n' "$2" > "$2/$4"
chmod +x "$2/$4"
"""
FAKE_SUITE_CONFTEST = 'pytest_plugins = ("fixtures.plugins.harness",)\n'
FAKE_CASE = """\
import subprocess, time

def test_replay_guard(pytestconfig):
    text = subprocess.run([pytestconfig.getoption("qemu")], capture_output=True, text=True).stdout
    if "x < 0" in text:
        time.sleep(600)  # a mutant that makes the suite hang
    assert "if (x > 0) {" in text
"""


# The per-mutant limit: far above a fake run (a second or two idle, several seconds on a loaded
# machine with parallel workers), far below the hanging mutant's sleep.
FAKE_TIMEOUT_S = 45


def fake_campaign(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    tree = tmp_path / "qemu"
    (tree / "hw" / "i386").mkdir(parents=True)
    (tree / "hw" / "i386" / "intel_iommu.c").write_text(FAKE_SOURCE)
    (tree / "configure").write_text(FAKE_CONFIGURE)
    (tree / "configure").chmod(0o755)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(FAKE_SUITE_CONFTEST)
    (suite / "test_fake.py").write_text(FAKE_CASE)
    argv = [
        "--qemu-src", str(tree), "--functions", "vtd_iommu_replay", "--output",
        str(tmp_path / "out"), "--timeout", str(FAKE_TIMEOUT_S), "--suite", str(suite), "--",
        str(suite),
    ]  # fmt: skip
    env = dict(fake_toolchain(tmp_path, FAKE_NINJA), PYTHONPATH=str(ROOT))
    return argv, env


def run_mutation(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ci.mutation", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_campaign_classifies_every_mutant_and_resumes(tmp_path: Path) -> None:
    argv, env = fake_campaign(tmp_path)
    first = run_mutation(argv, env)
    assert first.returncode == 0, first.stdout + first.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    by_line: dict[str, set[str]] = {}
    for m in results["mutant_list"]:
        by_line.setdefault(m["mutated"].strip(), set()).add(results["mutants"][m["key"]]["status"])
    statuses = {s for v in by_line.values() for s in v}
    assert {"killed", "survived", "build failed"} <= statuses, by_line
    assert by_line.get("if (x < 0) {") == {"timeout"}, by_line
    killed = [r for r in results["mutants"].values() if r["status"] == "killed"]
    assert killed
    assert all(r["killed_by"].endswith("::test_replay_guard") for r in killed)
    # The tree is as it was, and the report scores killed + timeout against survivors.
    assert (tmp_path / "qemu" / "hw" / "i386" / "intel_iommu.c").read_text() == FAKE_SOURCE
    assert "## Survivors (" in (tmp_path / "out" / "report.md").read_text()
    partial = run_mutation([*argv[: argv.index("--")], "--report-only"], env)
    assert partial.returncode == 0, partial.stderr
    assert f"{len(results['mutant_list'])} of a sample of" in partial.stdout
    # Interrupted: forget two results; a re-run runs exactly those two again.
    forgotten = sorted(results["mutants"])[:2]
    for key in forgotten:
        del results["mutants"][key]
    (tmp_path / "out" / "results.json").write_text(json.dumps(results))
    second = run_mutation(argv, env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stderr.count("mutation: [") == 2, second.stderr
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(again["mutants"]) == set(results["mutants"]) | set(forgotten)
    # A stronger suite: the survivors are run again (only they), the first result is kept and
    # the report gives the score before and after; a second re-run with the same suite is empty.
    survivors = {k for k, r in again["mutants"].items() if r["status"] == "survived"}
    assert survivors
    (tmp_path / "suite" / "test_fake.py").write_text(
        FAKE_CASE + '    assert "return 7;" in text and "return 0;" in text\n'
        '    assert "if (x > 0) {\\n        return 7;\\n    }\\n    return 0;\\n}" in text\n'
    )
    rerun = run_mutation(
        [*argv[: argv.index("--")], "--rerun-survivors", *argv[argv.index("--") :]], env
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stderr.count("mutation: [re-run") == len(survivors), rerun.stderr
    after = json.loads((tmp_path / "out" / "results.json").read_text())["mutants"]
    assert all(after[k]["before"]["status"] == "survived" for k in survivors)
    assert {after[k]["status"] for k in survivors} <= {"killed", "timeout"}
    assert f"Score before the re-run of {len(survivors)} survivors: " in rerun.stdout
    idle = run_mutation(
        [*argv[: argv.index("--")], "--rerun-survivors", *argv[argv.index("--") :]], env
    )
    assert idle.returncode == 0, idle.stderr
    assert "re-run" not in idle.stderr, idle.stderr


def test_report_counts_triaged_survivors_apart_with_their_reason() -> None:
    mutants = [
        Mutant(k, "hw/x.c", "f", 1, "x" if k == "e" else "a", f"b{k}", "")
        for k in ("e", "u", "s", "k")
    ]
    results: dict[str, dict[str, object]] = {
        "e": {"status": "survived"},
        "u": {"status": "survived"},
        "s": {"status": "survived"},
        "k": {"status": "killed", "before": {"status": "survived"}},
    }
    triage = {
        ("hw/x.c", "f", "x", "*"): Triage("equivalent", "same code"),
        ("hw/x.c", "f", "a", "bu"): Triage("unobservable", "no device reaches it"),
    }
    text = report(mutants, results, "meta", triage)
    assert "| hw/x.c | 1 | 0 | 1 | 1 | 1 | 0 | 50% |" in text
    assert "Score before the re-run of 1 survivors: 0%; after: 50%." in text
    assert "`e` equivalent: same code" in text
    assert "`u` unobservable: no device reaches it" in text
    assert "## Survivors (1)" in text

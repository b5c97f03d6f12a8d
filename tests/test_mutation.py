"""ci/mutation's pure parts: where functions are, which lines a range changes, mutant
generation restricted to lines, and the report's arithmetic. A real campaign builds QEMU
(`ci/mutation --qemu-src TREE`), which ci/test does not do."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from ci.mutation import (
    Mutant,
    changed_lines,
    function_ranges,
    generate,
    parse_functions,
    report,
)

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
    text = report(mutants, results, "meta")
    assert "| hw/x.c | 1 | 1 | 1 | 0 | 1 | 67% |" in text
    assert "| hw/x.c:g | 0 | 0 | 0 | 0 | 1 | - |" in text
    assert "## Survivors (1)" in text
    assert "-a\n+bs" in text


def test_parse_functions_keeps_each_function_with_its_file() -> None:
    picked = parse_functions("vfio_iommu_map_notify,vtd_iommu_replay")
    assert picked == {
        "hw/i386/intel_iommu.c": ("vtd_iommu_replay",),
        "hw/vfio/listener.c": ("vfio_iommu_map_notify",),
    }

"""Mutation score: mutate QEMU's vIOMMU notifier code and count the mutants the suite kills.

Usage: ci/mutation --qemu-src TREE [--build DIR] [--functions F,...] [--lines-of REV_RANGE]
                   [--sample N --seed S] [--output DIR] [--timeout S] [-- pytest args]

Mutants come from universalmutator (regexp rules for C: operators, constants, conditions,
statement deletion), restricted to the lines of the chosen functions (default: DEFAULT_FUNCTIONS,
the notifier / replay / page-walk / invalidation / address-space-switch paths) or, with
--lines-of, to the lines a commit range changes in those files. Each mutant is written over its
file, built incrementally (ci/build-qemu's build directory), and the selection (default
`-m qtest`) runs with fail-fast and a time limit. Every mutant ends as one of: killed (and by
which case), survived, timeout, build failed. The source file is always restored.

Results go to OUTPUT/results.json (after every mutant: an interrupted run resumes where it
stopped, with the same sample) and OUTPUT/report.md: the score per file and per function, and
every survivor with its diff. A survivor listed in ci/mutation_equivalent.toml (with the reason
it cannot change observable behaviour) is counted apart, so the score counts only mutants that
matter: score = (killed + timeout) / (killed + timeout + survived).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from ci.build_qemu import BuildError, build_tree
from ci.gate import with_suite_paths

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "ci" / "mutation_equivalent.toml"
DEFAULT_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "hw/i386/intel_iommu.c": (
        "vtd_page_walk_one", "vtd_page_walk_level", "vtd_page_walk",
        "vtd_sync_shadow_page_hook", "vtd_sync_shadow_page_table_range",
        "vtd_address_space_sync", "vtd_switch_address_space", "vtd_switch_address_space_all",
        "vtd_iommu_replay_all", "vtd_context_global_invalidate",
        "vtd_context_device_invalidate", "vtd_iotlb_global_invalidate",
        "vtd_iotlb_domain_invalidate", "vtd_iotlb_page_invalidate_notify",
        "vtd_iotlb_page_invalidate", "vtd_process_iotlb_desc", "vtd_piotlb_pasid_invalidate",
        "vtd_piotlb_page_invalidate", "vtd_process_piotlb_desc", "vtd_pasid_cache_sync",
        "vtd_process_device_iotlb_desc", "vtd_iommu_notify_flag_changed",
        "vtd_address_space_unmap", "vtd_address_space_unmap_all", "vtd_replay_hook",
        "vtd_iommu_replay",
    ),
    "system/memory.c": (
        "memory_region_register_iommu_notifier", "memory_region_iommu_replay",
        "memory_region_unregister_iommu_notifier", "memory_region_notify_iommu_one",
        "memory_region_notify_iommu",
    ),
    "hw/vfio/listener.c": (
        "vfio_iommu_map_notify", "vfio_listener_region_add", "vfio_listener_region_del",
    ),
    "hw/vfio-user/container.c": ("vfio_user_dma_unmap", "vfio_user_dma_map"),
}  # fmt: skip
STATUSES = ("killed", "timeout", "survived", "equivalent", "unobservable", "build failed")
# Triage kinds of a survivor (ci/mutation_equivalent.toml), neither counted in the score:
# "equivalent" cannot change what QEMU does; "unobservable" changes code no device the suite
# can attach reaches (the reason names why), so no case of any suite could kill it here.
TRIAGE_KINDS = ("equivalent", "unobservable")


class MutationError(BuildError):
    """The mutation run cannot go on; the message is the one line the user sees."""


@dataclass(frozen=True)
class Mutant:
    key: str  # stable across runs: file, function, original and mutated line
    file: str  # relative to the tree
    function: str
    line: int
    original: str
    mutated: str
    source: str  # the mutant's file in the output directory

    def diff(self) -> str:
        return f"@@ {self.file}:{self.line} ({self.function}) @@\n-{self.original}\n+{self.mutated}"


@dataclass(frozen=True)
class Triage:
    kind: str  # one of TRIAGE_KINDS
    reason: str


@dataclass
class Outcome:
    status: str
    killed_by: str = ""
    seconds: float = 0.0
    detail: str = ""


def function_ranges(text: str, names: tuple[str, ...]) -> dict[str, range]:
    """Line ranges (1-based, body braces included) of the named function definitions.

    QEMU's style makes this reliable without a C parser: a definition starts at column 0 with
    the name followed by '(' and no ';' before its body's '{' (also at column 0), and the body
    ends at the next '}' at column 0.
    """
    lines = text.splitlines()
    found: dict[str, range] = {}
    wanted = set(names)
    for i, line in enumerate(lines):
        match = re.match(r"^[A-Za-z_].*?\b([A-Za-z_]\w*)\(", line)
        if not match or match.group(1) not in wanted or match.group(1) in found:
            continue
        j = i
        while j < len(lines) and lines[j] != "{":
            if lines[j].rstrip().endswith(";"):
                break  # a declaration
            j += 1
        if j >= len(lines) or lines[j] != "{":
            continue
        end = next((k for k in range(j + 1, len(lines)) if lines[k] == "}"), None)
        if end is not None:
            found[match.group(1)] = range(j + 1, end + 2)
    return found


def changed_lines(tree: Path, rev_range: str, file: str) -> set[int]:
    """New-side line numbers that `git diff REV_RANGE` changes in `file`."""
    proc = subprocess.run(
        ["git", "-C", tree, "diff", "-U0", rev_range, "--", file],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise MutationError(f"git diff {rev_range}: {proc.stderr.strip() or 'failed'}")
    lines: set[int] = set()
    for match in re.finditer(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", proc.stdout, re.M):
        start, count = int(match.group(1)), int(match.group(2) or 1)
        lines.update(range(start, start + count))
    return lines


def generate(tree: Path, file: str, lines: dict[int, str], out: Path) -> list[Mutant]:
    """universalmutator's mutants of `file`, only on `lines` (line -> function)."""
    source = tree / file
    original = source.read_text().splitlines()
    where = out / "mutants" / file.replace("/", "_")
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    (where / "lines.txt").write_text("".join(f"{n}\n" for n in sorted(lines)))
    mutate = Path(sys.executable).parent / "mutate"
    proc = subprocess.run(
        [mutate, source, "c", "--noCheck", "--lines", where / "lines.txt", "--mutantDir", where],
        capture_output=True, text=True, check=False, cwd=where,
    )  # fmt: skip
    if proc.returncode != 0:
        raise MutationError(f"mutate {file}: {(proc.stderr or proc.stdout).strip()[-200:]}")
    mutants: list[Mutant] = []
    seen: Counter[str] = Counter()
    for path in sorted(where.glob("*.mutant.*.c"), key=lambda p: int(p.name.split(".")[-2])):
        text = path.read_text().splitlines()
        changed = [i for i, (a, b) in enumerate(zip(original, text, strict=False)) if a != b]
        if len(text) != len(original) or len(changed) != 1:
            continue  # universalmutator's rules change one line; anything else is skipped
        n = changed[0] + 1
        base = f"{file}:{lines.get(n, '?')}:{original[n - 1].strip()}=>{text[n - 1].strip()}"
        seen[base] += 1
        key = hashlib.sha256(f"{base}#{seen[base]}".encode()).hexdigest()[:16]
        mutants.append(
            Mutant(key, file, lines.get(n, "?"), n, original[n - 1], text[n - 1], str(path))
        )
    return mutants


def equivalents(path: Path = EQUIVALENT_FILE) -> dict[tuple[str, str, str, str], Triage]:
    """(file, function, original, mutated) -> triage, from ci/mutation_equivalent.toml."""
    if not path.is_file():
        return {}
    data = tomllib.loads(path.read_text())
    found = {}
    for e in data.get("equivalent", []):
        kind = e.get("kind", "equivalent")
        if kind not in TRIAGE_KINDS:
            raise MutationError(f"{path.name}: kind {kind!r} is not one of {TRIAGE_KINDS}")
        where = (e["file"], e["function"], e["original"].strip(), e["mutated"].strip())
        found[where] = Triage(kind, e["reason"])
    return found


def triaged(triage: dict[tuple[str, str, str, str], Triage], m: Mutant) -> Triage | None:
    """The triage of a mutant: its own entry, or one for every mutant of its line
    (mutated = "*": the reason holds whatever the line is changed to)."""
    where = (m.file, m.function, m.original.strip())
    return triage.get((*where, m.mutated.strip())) or triage.get((*where, "*"))


def write_fresh(source: Path, dest: Path) -> None:
    """Copy `source` over `dest` with a new modification time: ninja rebuilds by mtime, and a
    mutant (or the original) generated before the last build would otherwise look older than
    the object built from the other and be silently skipped."""
    shutil.copyfile(source, dest)
    os.utime(dest, None)


def first_failure(junit: Path) -> str:
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return ""
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            return f"{case.get('classname', '')}::{case.get('name', '')}"
    return ""


class Campaign:
    """One mutation run over a tree: baseline, then each sampled mutant, resumable."""

    def __init__(
        self,
        tree: Path,
        build: Path,
        out: Path,
        pytest_args: list[str],
        timeout: float,
        suite: Path = ROOT,
    ) -> None:
        self.tree, self.build, self.out, self.suite = tree, build, out, suite
        self.pytest_args = pytest_args
        self.timeout = timeout
        self.results_path = out / "results.json"
        self.results: dict[str, dict[str, object]] = {}
        if self.results_path.is_file():
            self.results = json.loads(self.results_path.read_text()).get("mutants", {})

    def restore(self, file: str) -> None:
        backup = self.out / "originals" / file
        if backup.is_file() and (self.tree / file).read_bytes() != backup.read_bytes():
            write_fresh(backup, self.tree / file)

    def keep_original(self, file: str) -> None:
        backup = self.out / "originals" / file
        if backup.is_file():
            self.restore(file)  # a previous run may have died with a mutant in place
        else:
            backup.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.tree / file, backup)

    def qemu(self) -> Path:
        return build_tree(self.tree, self.build)

    def run_suite(self, qemu: Path, name: str, timeout: float | None) -> tuple[int | None, str]:
        junit = self.out / "junit" / f"{name}.xml"
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "pytest", *with_suite_paths(self.pytest_args), "-x", "-q",
            "-p", "no:cacheprovider",
            f"--qemu={qemu}", f"--junitxml={junit}", f"--artefacts={self.out / 'artefacts'}",
        ]  # fmt: skip
        with (self.out / "junit" / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=self.suite, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env=dict(os.environ, VIOMMU_QEMU=str(qemu), PYTHONPATH=str(ROOT)),
            )  # fmt: skip
            try:
                return proc.wait(timeout=timeout), first_failure(junit)
            except subprocess.TimeoutExpired:
                return None, ""
            finally:
                if proc.poll() is None:
                    # The suite's own teardown reaps QEMU on SIGTERM; SIGKILL if it hangs.
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()

    def baseline(self) -> float:
        qemu = self.qemu()
        start = time.monotonic()
        code, failed = self.run_suite(qemu, "baseline", None)
        if code not in (0, 5):
            raise MutationError(
                f"the selection does not pass on the unmutated tree (exit {code}"
                + (f", first failure {failed}" if failed else "")
                + f"; log {self.out / 'junit' / 'baseline.log'})"
            )
        return time.monotonic() - start

    def run(self, mutant: Mutant) -> Outcome:
        start = time.monotonic()
        write_fresh(Path(mutant.source), self.tree / mutant.file)
        try:
            try:
                qemu = self.qemu()
            except BuildError as err:
                return Outcome("build failed", seconds=time.monotonic() - start, detail=str(err))
            code, failed = self.run_suite(qemu, mutant.key, self.timeout)
        finally:
            self.restore(mutant.file)
        seconds = time.monotonic() - start
        if code is None:
            return Outcome("timeout", seconds=seconds)
        if code == 0:
            return Outcome("survived", seconds=seconds)
        return Outcome("killed", killed_by=failed or f"pytest exit {code}", seconds=seconds)

    def save(self, meta: dict[str, object]) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**meta, "mutants": self.results}, indent=1, sort_keys=True))
        tmp.replace(self.results_path)


def score(c: Counter[str]) -> str:
    counted = c["killed"] + c["timeout"] + c["survived"]
    return f"{100 * (c['killed'] + c['timeout']) / counted:.0f}%" if counted else "-"


def report(
    mutants: list[Mutant],
    results: dict[str, dict[str, object]],
    meta: str,
    triage: dict[tuple[str, str, str, str], Triage] | None = None,
) -> str:
    triage = equivalents() if triage is None else triage
    per_file: dict[str, Counter[str]] = defaultdict(Counter)
    per_function: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    before: Counter[str] = Counter()  # the first run of every mutant a later suite re-ran
    survivors: list[Mutant] = []
    set_apart: list[tuple[Mutant, Triage]] = []
    rerun = 0
    for m in mutants:
        if m.key not in results:
            continue
        status = str(results[m.key]["status"])
        first = results[m.key].get("before")
        first_status = str(first["status"]) if isinstance(first, dict) else status
        rerun += first is not None
        found = triaged(triage, m)
        if found is not None and "survived" in (status, first_status):
            set_apart.append((m, found))
        if status == "survived":
            if found is not None:
                status = found.kind
            else:
                survivors.append(m)
        if first_status == "survived" and found is not None:
            first_status = found.kind
        per_file[m.file][status] += 1
        per_function[(m.file, m.function)][status] += 1
        before[first_status] += 1

    head = "| where | " + " | ".join(STATUSES) + " | score |\n|---|" + "---|" * (len(STATUSES) + 1)
    rows = [f"# Mutation report\n\n{meta}\n", "## Per file\n", head]
    total: Counter[str] = Counter()
    for file, counts in sorted(per_file.items()):
        total.update(counts)
        rows.append(
            f"| {file} | " + " | ".join(str(counts[s]) for s in STATUSES) + f" | {score(counts)} |"
        )
    rows.append(
        "| **all** | " + " | ".join(str(total[s]) for s in STATUSES) + f" | {score(total)} |"
    )
    rows += ["", "## Per function\n", head]
    for (file, function), counts in sorted(per_function.items()):
        rows.append(
            f"| {file}:{function} | "
            + " | ".join(str(counts[s]) for s in STATUSES)
            + f" | {score(counts)} |"
        )
    if rerun:
        rows.insert(1, f"Score before the re-run of {rerun} survivors: {score(before)}; "
                       f"after: {score(total)}.\n")  # fmt: skip
    rows += ["", f"## Survivors ({len(survivors)})\n"]
    for m in survivors:
        rows += [f"`{m.key}`\n", "```diff", m.diff(), "```", ""]
    rows += ["", f"## Triaged: equivalent or unobservable ({len(set_apart)})\n"]
    for m, found in set_apart:
        rows += [f"`{m.key}` {found.kind}: {found.reason}\n", "```diff", m.diff(), "```", ""]
    return "\n".join(rows) + "\n"


def select_lines(
    tree: Path, functions: dict[str, tuple[str, ...]], rev_range: str | None
) -> dict[str, dict[int, str]]:
    chosen: dict[str, dict[int, str]] = {}
    for file, names in functions.items():
        path = tree / file
        if not path.is_file():
            print(f"mutation: {file} not in this tree, skipped", file=sys.stderr)
            continue
        ranges = function_ranges(path.read_text(), names)
        for name in sorted(set(names) - set(ranges)):
            print(f"mutation: {file}: no function {name} in this tree", file=sys.stderr)
        lines = {n: name for name, r in ranges.items() for n in r}
        if rev_range:
            changed = changed_lines(tree, rev_range, file)
            lines = {n: f for n, f in lines.items() if n in changed}
        if lines:
            chosen[file] = lines
    return chosen


def parse_functions(value: str | None) -> dict[str, tuple[str, ...]]:
    if not value:
        return DEFAULT_FUNCTIONS
    wanted = {f.strip() for f in value.split(",") if f.strip()}
    picked = {
        file: tuple(f for f in names if f in wanted) for file, names in DEFAULT_FUNCTIONS.items()
    }
    unknown = wanted - {f for names in picked.values() for f in names}
    if unknown:
        # Not one of the defaults: look for it in intel_iommu.c, the usual place.
        picked["hw/i386/intel_iommu.c"] += tuple(sorted(unknown))
    return {file: names for file, names in picked.items() if names}


def write_partial_report(out: Path) -> int:
    """report.md from what results.json holds (an interrupted or still running campaign)."""
    path = out / "results.json"
    if not path.is_file():
        print(f"mutation: no results in {out}", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    sample = [Mutant(**m) for m in data.get("mutant_list", [])]
    done = sum(1 for m in sample if m.key in data["mutants"])
    summary = (
        f"Tree `{data.get('tree')}`, selection `{' '.join(data.get('pytest_args', []))}`, "
        f"{done} of a sample of {len(sample)} run so far ({data.get('generated')} mutants "
        f"generated, seed {data.get('seed')}), baseline {data.get('baseline_s')} s."
    )
    text = report(sample, data["mutants"], summary)
    (out / "report.md").write_text(text)
    print(text)
    return 0


def progress(where: str, mutant: Mutant, outcome: Outcome) -> None:
    print(f"mutation: {where} {outcome.status:12} {outcome.seconds:5.1f} s "
          f"{mutant.file}:{mutant.line} {mutant.function}: {mutant.mutated.strip()[:60]}"
          + (f"  <- {outcome.killed_by}" if outcome.killed_by else ""),
          file=sys.stderr, flush=True)  # fmt: skip


def suite_revision(suite: Path) -> str:
    """The suite's commit (with '+' if its tree has changes): a re-run is per suite version."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(suite), *args], capture_output=True, text=True)

    head = git("rev-parse", "--short=12", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+" if dirty else "")


def rerun_candidates(
    sample: list[Mutant], results: dict[str, dict[str, object]], suite: str
) -> list[Mutant]:
    """Untriaged survivors not yet re-run with this suite (revision and selection; a resumed
    re-run skips the ones done)."""
    triage = equivalents()
    return [
        m
        for m in sample
        if m.key in results
        and results[m.key]["status"] == "survived"
        and results[m.key].get("suite") != suite
        and triaged(triage, m) is None
    ]


def _terminated(signum: int, _frame: object) -> None:
    # SIGTERM (a cancelled CI job, `kill`) stops like Ctrl-C: the source file is restored and
    # the results so far are kept. A background job started by a shell ignores SIGINT.
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    pytest_args: list[str] = []
    if "--" in argv:
        argv, pytest_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu-src", type=Path, required=True)
    parser.add_argument("--build", type=Path, help="default: QEMU_SRC/build-viommu")
    parser.add_argument("--functions", help="comma-separated function names (default: all)")
    parser.add_argument("--lines-of", metavar="REV_RANGE", help="only lines this range changes")
    parser.add_argument("--sample", type=int, help="mutants to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="default: artefacts/mutation-<tree name>")
    parser.add_argument("--timeout", type=float, help="per mutant (default: 3x the baseline)")
    parser.add_argument("--suite", type=Path, default=ROOT, help=argparse.SUPPRESS)  # self-tests
    parser.add_argument(
        "--report-only", action="store_true", help="write report.md from results.json so far"
    )
    parser.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="only run the sample's untriaged survivors again, with the suite as it is now "
        "(the first result is kept: the report gives the score before and after)",
    )
    options = parser.parse_args(argv)
    tree = options.qemu_src.resolve()
    out = (options.output or ROOT / "artefacts" / f"mutation-{tree.name}").absolute()
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    pytest_args = pytest_args or ["-m", "qtest"]
    if options.report_only:
        return write_partial_report(out)
    campaign = Campaign(tree, (options.build or tree / "build-viommu").absolute(), out,
                        pytest_args, options.timeout or 0.0, options.suite.resolve())  # fmt: skip
    touched: set[str] = set()
    try:
        chosen = select_lines(tree, parse_functions(options.functions), options.lines_of)
        if not chosen:
            raise MutationError("no line to mutate (functions not found, or none changed)")
        for file in chosen:
            campaign.keep_original(file)
            touched.add(file)
        mutants = [m for file, lines in chosen.items() for m in generate(tree, file, lines, out)]
        sample = list(mutants)
        if options.sample and options.sample < len(sample):
            sample = random.Random(options.seed).sample(sample, options.sample)
        print(f"mutation: {len(mutants)} mutants, running {len(sample)}", file=sys.stderr)
        base_s = campaign.baseline()
        campaign.timeout = options.timeout or max(60.0, 3 * base_s)
        meta = {"tree": str(tree), "pytest_args": pytest_args, "sample": len(sample),
                "generated": len(mutants), "seed": options.seed, "baseline_s": round(base_s, 1),
                "mutant_list": [asdict(m) for m in sample]}  # fmt: skip
        for n, mutant in enumerate(sample, 1):
            # A re-run takes only survivors: mutants not run yet are a plain run's to do.
            if mutant.key in campaign.results or options.rerun_survivors:
                continue
            outcome = campaign.run(mutant)
            campaign.results[mutant.key] = asdict(outcome)
            campaign.save(meta)
            progress(f"[{n}/{len(sample)}]", mutant, outcome)
        if options.rerun_survivors:
            # A survivor is re-run once per suite revision and selection (qtest, then guest).
            suite = f"{suite_revision(campaign.suite)} {' '.join(pytest_args)}"
            again = rerun_candidates(sample, campaign.results, suite)
            for n, mutant in enumerate(again, 1):
                first = campaign.results[mutant.key]
                outcome = campaign.run(mutant)
                campaign.results[mutant.key] = {
                    **asdict(outcome),
                    "suite": suite,
                    "before": first.get("before", first),
                }
                campaign.save(meta)
                progress(f"[re-run {n}/{len(again)}]", mutant, outcome)
        campaign.save(meta)
        campaign.qemu()  # leave the build directory with the unmutated binary
        summary = (
            f"Tree `{tree}`, selection `{' '.join(pytest_args)}`, {len(sample)} of "
            f"{len(mutants)} mutants (seed {options.seed}), baseline {base_s:.0f} s."
        )
        text = report(sample, campaign.results, summary)
        (out / "report.md").write_text(text)
        print(text)
    except MutationError as err:
        print(f"mutation: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mutation: interrupted; re-run the same command to resume ({out})", file=sys.stderr)
        return 130
    finally:
        for file in touched:
            campaign.restore(file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

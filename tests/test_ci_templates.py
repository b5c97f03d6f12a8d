"""The CI templates are valid GitLab CI / GitHub workflow files (check-jsonschema's built-in,
vendored schemas: no network), and the check rejects a broken one. Their shards agree: every
sharded job runs as many groups as the merging job merges, by the committed durations file.

Their build step is `ci/build-qemu`, whose option probing tests/test_build_qemu.py runs against
fake old- and new-style trees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
CHECK = Path(sys.executable).parent / "check-jsonschema"
TEMPLATES = {
    "gitlab-ci.yml": ["--builtin-schema", "vendor.gitlab-ci", "--data-transform", "gitlab-ci"],
    "github-workflow.yml": ["--builtin-schema", "vendor.github-workflows"],
}


def validate(path: Path, schema: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHECK, *schema, path], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_matches_its_schema(name: str) -> None:
    result = validate(ROOT / "ci" / name, TEMPLATES[name])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_broken_template_is_rejected(name: str, tmp_path: Path) -> None:
    text = (ROOT / "ci" / name).read_text()
    # A job (GitLab) or a step (GitHub) with a key neither schema allows.
    if name == "gitlab-ci.yml":
        broken = text.replace("  stage: test\n", "  stage: test\n  scriptt: [oops]\n", 1)
    else:
        broken = text.replace("    runs-on: ubuntu-latest\n", "    runs-onn: ubuntu-latest\n", 1)
    assert broken != text
    (tmp_path / name).write_text(broken)
    result = validate(tmp_path / name, TEMPLATES[name])
    assert result.returncode == 1, result.stdout + result.stderr


# ---- shards ----------------------------------------------------------------------------------
def load(name: str) -> Any:
    # Round-trip mode keeps GitLab's !reference tags instead of refusing them.
    return YAML(typ="rt").load((ROOT / "ci" / name).read_text())


def test_gitlab_shards_are_one_count_and_every_shard_is_merged() -> None:
    ci = load("gitlab-ci.yml")
    shards = int(ci["variables"]["VIOMMU_SHARDS"])
    sharded = [name for name, job in ci.items() if isinstance(job, dict) and "parallel" in job]
    assert sorted(sharded) == ["viommu-conformance", "viommu-gate"]
    for name in sharded:
        assert ci[name]["parallel"] == shards, name
        assert any("$VIOMMU_SHARD_ARGS" in str(line) for line in ci[name]["script"]), name
    args = ci["variables"]["VIOMMU_SHARD_ARGS"]
    assert "--splits=$CI_NODE_TOTAL --group=$CI_NODE_INDEX" in args
    assert "--splitting-algorithm=least_duration" in args
    assert "--durations-path=ci/test-durations.json" in args
    verdict = ci["viommu-gate-verdict"]
    assert verdict["needs"][0]["job"] == "viommu-gate"
    assert verdict["rules"][0]["when"] == "always"
    script = "\n".join(map(str, verdict["script"]))
    assert 'seq "$VIOMMU_SHARDS"' in script
    assert "--baseline-junit" in script


def test_github_shards_are_one_count_and_every_shard_is_merged() -> None:
    flow = load("github-workflow.yml")
    shards = int(flow["env"]["VIOMMU_SHARDS"])
    for name in ("conformance", "gate"):
        job = flow["jobs"][name]
        assert list(job["strategy"]["matrix"]["shard"]) == list(range(1, shards + 1)), name
        assert job["strategy"]["fail-fast"] is False, name
        run = "\n".join(str(step.get("run", "")) for step in job["steps"])
        assert '--splits="$VIOMMU_SHARDS" --group=${{ matrix.shard }}' in run, name
        assert "$VIOMMU_SPLIT_ARGS" in run, name
    assert "--splitting-algorithm=least_duration" in flow["env"]["VIOMMU_SPLIT_ARGS"]
    assert "--durations-path=ci/test-durations.json" in flow["env"]["VIOMMU_SPLIT_ARGS"]
    verdict = flow["jobs"]["gate-verdict"]
    assert verdict["needs"] == "gate"
    assert verdict["if"].startswith("always()")
    run = "\n".join(str(step.get("run", "")) for step in verdict["steps"])
    assert 'seq "$VIOMMU_SHARDS"' in run
    assert "--baseline-junit" in run


def test_the_durations_file_is_pytest_splits_shape() -> None:
    """Node id -> seconds, as `--store-durations` writes it, for the suite's own test dirs."""
    durations = json.loads((ROOT / "ci" / "test-durations.json").read_text())
    assert isinstance(durations, dict)
    assert durations
    for node_id, seconds in durations.items():
        assert node_id.split("/", 1)[0] in ("tests", "conformance"), node_id
        assert "::" in node_id, node_id
        assert isinstance(seconds, float | int), node_id
        assert seconds >= 0, node_id

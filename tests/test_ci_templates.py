"""The CI templates are valid GitLab CI / GitHub workflow files (check-jsonschema's built-in,
vendored schemas: no network), and the check rejects a broken one.

Their build step is `ci/build-qemu`, whose option probing tests/test_build_qemu.py runs against
fake old- and new-style trees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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

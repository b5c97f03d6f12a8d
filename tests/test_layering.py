"""The layers of fixtures/ import only what they may (read from every module's imports).

One rule table, checked on the real tree and, so that the check itself can fail, on a small
hand-made tree with one forbidden import per rule. A violation names the file, the line and the
import. Cases (conformance/) and self-tests (tests/) sit on top of every layer and are not
checked; `if TYPE_CHECKING:` imports count like any other (a layer's types are its API too).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}

# The one-way flow: qemu at the bottom; the device hosts and the VT-d driver above it; the guest
# above those; the oracle beside everything and pure; rig where a tier meets the oracle; plugins
# on top. `fixtures` itself (the root package) holds only HarnessError and the page sizes.
_DEVICE_HOST_FORBIDDEN = (
    "fixtures.vtd",
    "fixtures.guest",
    "fixtures.rig",
    "fixtures.plugins",
    "fixtures.virtio",
)
_TOP = ("fixtures.rig", "fixtures.plugins")


@dataclass(frozen=True)
class LayerRule:
    """What the modules under `path` (relative to the project root) must not import."""

    path: str
    forbidden: tuple[str, ...] = ()
    # Exceptions to `forbidden` (a record-type module of the oracle, for instance).
    allowed: tuple[str, ...] = ()
    # Only these (plus the standard library) when set: the pure layers.
    only: tuple[str, ...] | None = None


RULES = (
    LayerRule("fixtures/oracle", only=("fixtures", "fixtures.oracle")),
    LayerRule(
        "fixtures/qemu",
        forbidden=(
            "fixtures.vfio_user",
            "fixtures.vhost_user",
            "fixtures.vtd",
            "fixtures.virtio",
            "fixtures.oracle",
            "fixtures.guest",
            *_TOP,
        ),
    ),
    LayerRule(
        "fixtures/vfio_user",
        forbidden=(*_DEVICE_HOST_FORBIDDEN, "fixtures.vhost_user", "fixtures.oracle"),
        allowed=("fixtures.oracle.dma_event",),
    ),
    LayerRule(
        "fixtures/vhost_user",
        forbidden=(*_DEVICE_HOST_FORBIDDEN, "fixtures.vfio_user", "fixtures.oracle"),
        allowed=("fixtures.oracle.dma_event",),
    ),
    LayerRule(
        "fixtures/vtd",
        forbidden=(
            "fixtures.oracle",
            "fixtures.vfio_user",
            "fixtures.vhost_user",
            "fixtures.guest",
            *_TOP,
        ),
    ),
    LayerRule("fixtures/virtio", forbidden=("fixtures.oracle", "fixtures.guest", *_TOP)),
    LayerRule(
        "fixtures/guest",
        forbidden=("fixtures.oracle", *_TOP),
        allowed=("fixtures.oracle.dma_event",),
    ),
    LayerRule("fixtures/rig", forbidden=("fixtures.plugins",)),
    # Provisioning runs on the host's python3 before the virtualenv exists; the agent runs
    # inside the guest: both are standard library (and their own package) only.
    LayerRule("ci/private_apt.py", only=()),
    LayerRule("ci/provision_venv.py", only=("ci",)),
    LayerRule("ci/provision_qemu.py", only=("ci",)),
    LayerRule("ci/provision_old_qemu.py", only=("ci",)),
    LayerRule("guests/build.py", only=("ci", "guests.cache", "guests.kernel", "guests.packages")),
    LayerRule("guests/kernel.py", only=("ci", "guests.cache", "guests.packages")),
    LayerRule("guests/packages.py", only=("ci",)),
    LayerRule("guests/cache.py", only=()),
    LayerRule("guests/agent.py", only=()),
)


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.imported} ({self.rule})"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """Every module `path` imports, relative imports resolved, with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(root, path).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from fixtures import oracle` imports the sub-package fixtures.oracle: name the
            # most specific module.
            subs = [
                f"{module}.{a.name}" for a in node.names if _is_module(root, f"{module}.{a.name}")
            ]
            if len(subs) < len(node.names):
                yield node.lineno, module
            for sub in subs:
                yield node.lineno, sub


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _within_only(module: str, only: tuple[str, ...]) -> bool:
    """Like _within, but the root package `fixtures` stands for itself, not its sub-packages."""
    return any(module == p or (p != "fixtures" and module.startswith(p + ".")) for p in only)


def _is_module(root: Path, module: str) -> bool:
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def check(root: Path, rules: tuple[LayerRule, ...] = RULES) -> list[Violation]:
    found: list[Violation] = []
    for rule in rules:
        target = root / rule.path
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for path in files:
            if not path.is_file():
                continue
            seen: set[tuple[int, str]] = set()
            for line, module in imports_of(root, path):
                top = module.split(".")[0]
                if top in STDLIB or (line, module) in seen:
                    continue
                seen.add((line, module))
                if rule.only is not None:
                    if not _within_only(module, rule.only):
                        extra = f" and {', '.join(rule.only)}" if rule.only else ""
                        found.append(
                            Violation(
                                str(path.relative_to(root)),
                                line,
                                module,
                                f"{rule.path} may import only the standard library{extra}",
                            )
                        )
                elif _within(module, rule.forbidden) and not _within(module, rule.allowed):
                    forbidden = next(p for p in rule.forbidden if _within(module, (p,)))
                    found.append(
                        Violation(
                            str(path.relative_to(root)),
                            line,
                            module,
                            f"{rule.path} must not import {forbidden}",
                        )
                    )
    return found


def test_every_layer_imports_only_what_it_may() -> None:
    violations = check(ROOT)
    assert not violations, "layering broken:\n" + "\n".join(map(str, violations))


def test_no_module_is_left_directly_in_fixtures() -> None:
    loose = sorted(p.name for p in (ROOT / "fixtures").glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"fixtures/ holds only layer packages, found modules {loose}"


def test_every_layer_package_states_its_public_names() -> None:
    missing = []
    for init in sorted((ROOT / "fixtures").glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        names = {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        if ast.get_docstring(tree) is None or "__all__" not in names:
            missing.append(str(init.relative_to(ROOT)))
    assert not missing, f"layer packages without a docstring and __all__: {missing}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in (
        "fixtures",
        "fixtures/oracle",
        "fixtures/vtd",
        "fixtures/vfio_user",
        "fixtures/rig",
        "fixtures/qemu",
        "fixtures/guest",
        "fixtures/plugins",
    ):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    (tmp_path / "fixtures/oracle/dma_event.py").touch()
    (tmp_path / "fixtures/oracle/walk.py").touch()
    (tmp_path / "fixtures/vtd/driver.py").touch()
    (tmp_path / "fixtures/rig/vtd_rig.py").touch()
    (tmp_path / "fixtures/qemu/machine.py").touch()
    (tmp_path / "fixtures/plugins/harness.py").touch()
    return tmp_path


@pytest.mark.parametrize(
    ("path", "source", "offending"),
    [
        ("fixtures/oracle/bad.py", "import asyncio\nimport paramiko\n", "paramiko"),
        (
            "fixtures/oracle/bad.py",
            "from fixtures.qemu.machine import Machine\n",
            "fixtures.qemu.machine",
        ),
        ("fixtures/oracle/bad.py", "from ..vtd import driver\n", "fixtures.vtd.driver"),
        (
            "fixtures/vtd/bad.py",
            "from fixtures.oracle.walk import walk_device\n",
            "fixtures.oracle.walk",
        ),
        ("fixtures/vfio_user/bad.py", "from fixtures.oracle import walk\n", "fixtures.oracle.walk"),
        (
            "fixtures/vfio_user/bad.py",
            "from fixtures.vtd.driver import VtdDriver\n",
            "fixtures.vtd.driver",
        ),
        (
            "fixtures/qemu/bad.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from fixtures.rig.vtd_rig import VtdRig\n",
            "fixtures.rig.vtd_rig",
        ),
        (
            "fixtures/guest/bad.py",
            "def f():\n    import fixtures.oracle.walk\n",
            "fixtures.oracle.walk",
        ),
        (
            "fixtures/rig/bad.py",
            "from fixtures.plugins import harness\n",
            "fixtures.plugins.harness",
        ),
    ],
)
def test_a_forbidden_import_is_named_with_its_file_and_line(
    tmp_path: Path, path: str, source: str, offending: str
) -> None:
    root = _tree(tmp_path, {path: source})
    violations = check(root)
    assert [(v.file, v.imported) for v in violations] == [(path, offending)], violations
    assert str(violations[0]).startswith(f"{path}:{violations[0].line}: imports {offending} (")


def test_allowed_imports_pass(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "fixtures/vfio_user/ok.py": "from fixtures.oracle.dma_event import DmaEvent\n"
            "from fixtures import HarnessError\nfrom . import wire\n",
            "fixtures/oracle/ok.py": "import enum\nfrom fixtures import HarnessError\n"
            "from .walk import walk_device\n",
            "fixtures/rig/ok.py": "from fixtures.oracle import walk\n"
            "from fixtures.vtd import driver\n",
        },
    )
    assert check(root) == []

"""The capability probe's cache: reused only for exactly the installation that was probed.

The real QEMU is probed through launchers written here; whether an answer was reused is told
by a QEMU that can no longer answer (its launcher now names a file that is not there) or by
the stored entry being rewritten.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest

from fixtures.qemu import probe_cache
from fixtures.qemu.capabilities import probe
from fixtures.qemu.errors import QEMUBinaryError

PROVISIONED = """#!/bin/sh
# generated
R=/opt/qemu/root
exec "$R/lib/ld-linux-x86-64.so.2" --inhibit-cache \\
  --library-path "$R/lib:$R/usr/lib" \\
  --argv0 qemu-system-x86_64 "$R/usr/bin/qemu-system-x86_64" "$@"
"""


def script(tmp_path: Path, text: str, name: str = "qemu-system-x86_64") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_the_provisioned_launcher_is_seen_through(tmp_path: Path) -> None:
    assert probe_cache.named_paths(script(tmp_path, PROVISIONED)) == [
        "/bin/sh",
        "/opt/qemu/root/lib/ld-linux-x86-64.so.2",
        "/opt/qemu/root/lib",
        "/opt/qemu/root/usr/lib",
        "/opt/qemu/root/usr/bin/qemu-system-x86_64",
    ]


@pytest.mark.parametrize(
    "body",
    [
        'case "$*" in *none*) exec /usr/bin/qemu "$@";; esac\nexit 1',  # branches on arguments
        'exec "$QEMU_REAL" "$@"',  # the environment picks the binary
        'R=$(cat /etc/which-qemu)\nexec "$R" "$@"',  # a file picks it
        'exec qemu-system-x86_64 "$@"',  # PATH picks it
        '/usr/bin/qemu "$@"',  # no exec: QEMU is not the probed process
        'exec /usr/bin/qemu "$@" 2>/dev/null',  # redirection
        "exec /usr/bin/qemu '$@'",
        'exec /usr/bin/qemu-$VERSION "$@"',  # unset variable
        "echo 'not a QEMU' >&2; exit 3",
    ],
)
def test_a_launcher_whose_target_its_text_does_not_fix_is_never_cached(
    tmp_path: Path, body: str
) -> None:
    assert probe_cache.named_paths(script(tmp_path, f"#!/bin/sh\n{body}\n")) is None


def test_a_file_that_is_neither_elf_nor_script_is_never_cached(tmp_path: Path) -> None:
    assert probe_cache.named_paths(script(tmp_path, "qemu\n")) is None


def _copied_qemu(tmp_path: Path, qemu: str) -> tuple[str, Path]:
    """A launcher running a private copy of the QEMU under test's executable the way `qemu`
    runs the original (same loader, same libraries); returns it and the copy."""
    words = probe_cache.launch_words(qemu)
    if words is None:
        pytest.skip(f"{qemu} is a launcher the cache does not see through")
    binary = next(w for w in reversed(words) if Path(w).name.startswith("qemu-system"))
    copy = tmp_path / "bin" / "qemu-system-x86_64"
    copy.parent.mkdir()
    shutil.copy2(binary, copy)
    run = [str(copy) if w == binary else w for w in words]
    # Without the interpreter: the new launcher is a /bin/sh script of its own.
    run = run if len(run) == 1 else run[1:]
    launcher = script(tmp_path, f'#!/bin/sh\nexec {shlex.join(run)} "$@"\n', name="qemu")
    return launcher, copy


def test_answers_are_reused_until_the_binary_changes(tmp_path: Path, qemu_binary: str) -> None:
    launcher, copy = _copied_qemu(tmp_path, qemu_binary)
    cache = tmp_path / "cache"
    first = probe(launcher, cache=cache)
    [entry] = cache.iterdir()
    stored = entry.stat().st_mtime_ns
    assert probe(launcher, cache=cache) == first
    assert entry.stat().st_mtime_ns == stored, "an unchanged installation was probed again"
    # Rewritten in place with the same bytes: same inode, size and content, new ctime.
    data = copy.read_bytes()
    copy.write_bytes(data)
    assert probe(launcher, cache=cache) == first
    assert entry.stat().st_mtime_ns != stored, "a rewritten binary reused the old answers"


def test_a_replaced_binary_is_probed_not_answered_from_the_cache(
    tmp_path: Path, qemu_binary: str
) -> None:
    launcher, copy = _copied_qemu(tmp_path, qemu_binary)
    cache = tmp_path / "cache"
    probe(launcher, cache=cache)
    # A binary that cannot answer: any reuse of the stored answers would hide that.
    replacement = copy.with_name("replacement")
    replacement.write_bytes(b"\x7fELF not really")
    os.replace(replacement, copy)
    with pytest.raises(QEMUBinaryError):
        probe(launcher, cache=cache)


def test_a_changed_library_directory_or_environment_misses(
    tmp_path: Path, qemu_binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher, copy = _copied_qemu(tmp_path, qemu_binary)
    cache = tmp_path / "cache"
    probe(launcher, cache=cache)
    [entry] = cache.iterdir()
    stored = entry.stat().st_mtime_ns
    (copy.parent / "libnew.so").write_bytes(b"")  # beside a mapped file: the directory changed
    probe(launcher, cache=cache)
    assert entry.stat().st_mtime_ns != stored
    stored = entry.stat().st_mtime_ns
    monkeypatch.setenv("QEMU_MODULE_DIR", str(tmp_path))
    probe(launcher, cache=cache)
    assert entry.stat().st_mtime_ns != stored


def test_an_opaque_launcher_is_probed_every_time(tmp_path: Path, qemu_binary: str) -> None:
    branching = script(
        tmp_path, f'#!/bin/sh\ncase "$*" in *) exec {shlex.quote(qemu_binary)} "$@";; esac\n'
    )
    cache = tmp_path / "cache"
    probe(branching, cache=cache)
    assert not cache.exists() or not list(cache.iterdir())

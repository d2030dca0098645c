"""Atomic writes: nothing half-written, the old content kept on failure, normal file modes."""

from __future__ import annotations

import os
import stat

import pytest

from routertune.io_utils import atomic_dir, atomic_path, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left


def test_atomic_files_and_dirs_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "inner").write_text("y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f.txt") == 0o644  # readable by others, as open() would make it
    assert _mode(tmp_path / "d") == 0o755


def test_atomic_dir_swaps_in_complete_content_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "routers"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(ValueError), atomic_dir(target) as d:
        (d / "b").write_text("2")
        raise ValueError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as d:
        (d / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routers"]

"""Uploads read exactly the bytes that were checked: no symlink or hard link swapped in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from syncd.artifacts import (
    STAGE_PREFIX,
    ArtifactRefused,
    clean_stale_stages,
    resolve_artifact,
    staged,
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    (folder / "reports").mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"weights v1")
    (folder / "reports" / "a.txt").write_text("a")
    (tmp_path / "secret.txt").write_text("outside")
    return folder


def test_the_staged_copy_holds_the_checked_bytes_and_is_removed(
    run_dir: Path, tmp_path: Path
) -> None:
    upload = resolve_artifact(run_dir, "model.bin", None)
    with staged(upload, area=tmp_path) as (path, digest):
        assert path.name == "model.bin" and path.read_bytes() == b"weights v1"
        assert digest == upload.digest
        (run_dir / "model.bin").write_bytes(b"changed after staging")
        assert path.read_bytes() == b"weights v1"
    assert not list(tmp_path.glob(f"{STAGE_PREFIX}*"))


def test_a_symlink_swapped_in_after_the_check_is_refused(run_dir: Path, tmp_path: Path) -> None:
    upload = resolve_artifact(run_dir, "model.bin", None)
    (run_dir / "model.bin").unlink()
    (run_dir / "model.bin").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ArtifactRefused, match="outside the run directory"), staged(upload):
        pass


def test_a_hard_link_to_an_outside_file_is_outside(run_dir: Path, tmp_path: Path) -> None:
    upload = resolve_artifact(run_dir, "model.bin", None)
    (run_dir / "model.bin").unlink()
    os.link(tmp_path / "secret.txt", run_dir / "model.bin")
    with pytest.raises(ArtifactRefused, match="hard link"), staged(upload):
        pass


def test_hard_links_inside_the_run_directory_are_fine(run_dir: Path) -> None:
    os.link(run_dir / "model.bin", run_dir / "reports" / "model-copy.bin")
    upload = resolve_artifact(run_dir, "model.bin", None)
    with staged(upload) as (path, _digest):
        assert path.read_bytes() == b"weights v1"


def test_a_folder_is_staged_file_by_file_and_checked_again(run_dir: Path, tmp_path: Path) -> None:
    upload = resolve_artifact(run_dir, "reports", "out")
    with staged(upload) as (path, digest):
        assert path.name == "reports" and (path / "a.txt").read_text() == "a"
        assert digest == upload.digest
    (run_dir / "reports" / "b.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ArtifactRefused, match="outside"), staged(upload):
        pass


def test_stale_staging_folders_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f"{STAGE_PREFIX}{dead.stdout.strip()}-x"
    (stale / "model.bin").parent.mkdir()
    (stale / "model.bin").write_text("left by a SIGKILL")
    mine = tmp_path / f"{STAGE_PREFIX}{os.getpid()}-y"
    mine.mkdir()
    assert clean_stale_stages(tmp_path) == 1
    assert not stale.exists() and mine.exists()

"""peft.utils.io, the project's one atomic writer (the fork's adapters and commonsense's results)."""
import os
import stat

import pytest

from peft.utils.io import atomic_save, atomic_write_text


def test_written_file_has_the_mode_a_plain_open_gives(tmp_path):
    # mkstemp makes 0600 files; an adapter or a result must stay readable by whoever reads a plain file.
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(umask)
    modes = [stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("atomic.txt", "plain.txt")]
    assert modes == [0o644, 0o644]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "adapter_model.bin"
    target.write_bytes(b"old")

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"ne")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_save(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_model.bin"]


def test_a_missing_folder_is_an_error_not_created(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "config.json", "{}")
    assert not (tmp_path / "missing").exists()

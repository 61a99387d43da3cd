"""Atomic writes: permissions without touching the umask, long names, flushed to disk."""

import os
import stat

import pytest

from vidgen import fsutil


def write(path, data: bytes) -> None:
    tmp = fsutil.temp_beside(path)
    tmp.write_bytes(data)
    fsutil.publish(tmp, path)


def test_a_new_file_gets_the_umask_and_the_umask_is_never_changed(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:

        def no_umask(mask):  # another thread creating a file meanwhile would get `mask`
            raise AssertionError("the process umask was changed")

        monkeypatch.setattr(os, "umask", no_umask)
        write(tmp_path / "a.bin", b"x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o640
    assert (tmp_path / "a.bin").read_bytes() == b"x"


def test_a_replaced_file_keeps_its_mode_and_no_temp_file_is_left(tmp_path):
    path = tmp_path / "a.bin"
    write(path, b"old")
    os.chmod(path, 0o604)
    write(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o604
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


@pytest.mark.parametrize("char, count", [("v", 246), ("\U0001f600", 61), ("\u00e9", 123)])
def test_a_long_valid_name_is_written(tmp_path, char, count):
    # 250 / 248 / 250 bytes: valid; the temp name must be too (cut by bytes: 64 four-byte
    # characters were 256 bytes, and a cut inside a character must not leave half of it)
    path = tmp_path / (char * count + ".mp4")
    write(path, b"x")
    assert path.read_bytes() == b"x"


def test_the_file_is_flushed_before_it_is_renamed_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "a.bin"
    tmp = fsutil.temp_beside(path)
    tmp.write_bytes(b"x")
    fsutil.publish(tmp, path)
    assert events == [
        ("fsync", str(tmp.resolve())),
        ("replace", str(path)),
        ("fsync", str(tmp_path.resolve())),
    ]


@pytest.mark.parametrize("suffix", [".tmp", ".tmp.mp4"])
def test_temp_files_are_new_hidden_and_distinct(tmp_path, suffix):
    names = {fsutil.temp_beside(tmp_path / "sub" / "x.mp4", suffix) for _ in range(20)}
    assert len(names) == 20
    assert all(n.name.startswith(".x.") and n.name.endswith(suffix) for n in names)
    assert all(n.exists() and n.stat().st_size == 0 for n in names)


def test_remove_temps_takes_only_the_temp_files_a_writer_left(tmp_path):
    left = [
        fsutil.temp_beside(tmp_path / name, suffix)
        for name, suffix in [
            ("state.safetensors", ".tmp"),
            ("step-000010.mp4", ".tmp.mp4"),
            ("clips.npy", ".tmp.npy"),
        ]
    ]
    kept = [
        ".gitkeep",
        ".state.tmp",
        "state.safetensors",
        ".a.0123456.tmp",
        ".a.0123456g.tmp",
        "x.01234567.tmp",
    ]
    for name in kept:
        (tmp_path / name).write_text("keep")
    (tmp_path / ".sub.01234567.tmp").mkdir()  # a folder of that name is not a temp file
    assert all(p.exists() for p in left)
    assert fsutil.remove_temps(tmp_path) == 3
    assert not any(p.exists() for p in left)
    assert all((tmp_path / name).exists() for name in kept)
    assert (tmp_path / ".sub.01234567.tmp").is_dir()
    assert fsutil.remove_temps(tmp_path / "missing") == 0


@pytest.mark.parametrize("raw", [b"caf\xe9", b"\xe9" * 100])
def test_a_name_that_is_not_utf8_is_written(tmp_path, raw):
    """Names decoded with surrogate escapes (Latin-1 bytes on a UTF-8 system) had no
    str.encode(): every atomic write to them raised UnicodeEncodeError."""
    final = tmp_path / os.fsdecode(raw + b".bin")
    tmp = fsutil.temp_beside(final)
    tmp.write_bytes(b"data")
    fsutil.publish(tmp, final)
    assert final.read_bytes() == b"data" and os.listdir(tmp_path) == [final.name]


def test_a_write_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "real" / "f.bin"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    tmp = fsutil.temp_beside(link)
    assert tmp.parent == real.parent  # the rename stays on the target's filesystem
    tmp.write_bytes(b"new")
    fsutil.publish(tmp, link)
    assert link.is_symlink() and real.read_bytes() == b"new" and link.read_bytes() == b"new"


def test_a_tilde_with_no_such_user_is_left_as_it_is(tmp_path, monkeypatch):
    """Path.expanduser raised RuntimeError for ~draft.mp4 or ~nosuchuser/x.mp4: `vidgen
    render out=~draft.mp4` ended in a traceback, and a batch line's context ended the whole
    batch. A shell leaves such a word as it is; so does vidgen."""
    from pathlib import Path

    from vidgen.render_config import check_out

    monkeypatch.setenv("HOME", str(tmp_path))
    assert fsutil.expand_user("~/runs") == tmp_path / "runs"
    assert fsutil.expand_user("~draft.mp4") == Path("~draft.mp4")
    assert fsutil.expand_user("~no-such-user-here/x.mp4") == Path("~no-such-user-here/x.mp4")
    monkeypatch.chdir(tmp_path)
    assert check_out("~draft.mp4") == Path("~draft.mp4")
    with pytest.raises(ValueError, match="does not exist"):
        check_out("~no-such-user-here/x.mp4")

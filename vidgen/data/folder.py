"""Clips of the user's own videos: every video file under a folder, at any resolution."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from vidgen.data.worlds import NO_LABEL, to_model_range
from vidgen.fsutil import expand_user
from vidgen.io import VideoInfo, VideoReadError, probe_video, read_video
from vidgen.io.video import _parse_size
from vidgen.validate import check_int

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")


def video_files(root: Path, exclude: Path | None = None) -> list[Path]:
    """The video files under ``root`` (recursively, sorted), leaving out hidden ones: a dot
    file or folder is another program's (macOS ``._x.mp4``) or an unfinished write
    (vidgen's own ``.x.<random>.tmp.mp4``). Linked folders are followed (each real folder
    once: a link loop ends). A broken link is kept, so that reading it fails naming it
    instead of leaving the video out without a word. ``exclude``: a folder whose videos are
    left out wherever they are reached from, through links too (the held-out folder of a
    training folder), and so are the files its links point to (``val/c.mp4 -> ../c.mp4``:
    ``c.mp4`` is held out). A file reached twice (a link beside its target) is listed once,
    by its first path. A folder that cannot be listed is a ``VideoReadError`` naming it (its
    videos were left out without a word)."""
    excluded = _real(expand_user(exclude)) if exclude is not None else None
    held_files = set()
    if excluded is not None and excluded.is_dir():
        held_files = {_real(path) for path in video_files(excluded)}

    def held_out(path: Path) -> bool:
        if excluded is None:
            return False
        real = _real(path)
        return real.is_relative_to(excluded) or real in held_files

    def unlisted(err: OSError) -> None:
        raise VideoReadError(
            f"cannot list the folder {err.filename!s}: {err.strerror or err} (its videos "
            "would be left out)"
        )

    found = []
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, onerror=unlisted, followlinks=True):
        here = Path(folder)
        if held_out(here):
            dirs.clear()
            continue
        st = here.stat()
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: a loop
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            here / name
            for name in files
            if not name.startswith(".")
            and Path(name).suffix.lower() in VIDEO_SUFFIXES
            and ((here / name).is_file() or (here / name).is_symlink())  # no fifo, socket
            and not held_out(here / name)
        ]
    once: dict[Path, Path] = {}
    for path in sorted(found):
        once.setdefault(_real(path), path)
    return sorted(once.values())


def _real(path: Path) -> Path:
    """``path`` with its links followed; a link loop is left as far as it goes (``resolve``
    raised RuntimeError on it, a traceback from ``vidgen train`` and ``vidgen eval``: it is
    kept as a broken link is, and reading it fails naming it)."""
    return Path(os.path.realpath(path))


class VideoFolder(Dataset):
    """Clips of ``clip_len`` frames every ``stride`` frames from each video under ``root``
    (searched recursively; those under ``exclude``, a folder, left out wherever they are
    reached from: a relative ``exclude`` is the working directory's, as every path given on
    the command line is, and one that is not a folder is refused rather than excluding
    nothing), resized (shorter side) and centre-cropped to ``size``.

    Every file is probed when the dataset is built, so a corrupt file fails at once with a
    ``VideoReadError`` naming it instead of in the middle of training. Items have the same
    keys as ``WorldClips``: ``video`` float32 (T, 3, H, W) in [-1, 1], ``label`` = NO_LABEL,
    ``actions`` zeros, plus ``index`` (file number) and ``start``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        clip_len: int = 8,
        size: int | tuple[int, int] = 64,
        stride: int | None = None,
        exclude: str | os.PathLike | None = None,
    ) -> None:
        self.root = expand_user(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root {str(self.root)!r} is not a folder")
        check_int("clip_len", clip_len, minimum=1)  # 8.0 failed later as a bare TypeError
        stride = clip_len if stride is None else stride
        check_int("stride", stride, minimum=1)
        _parse_size(size)  # a bad size was only found at the first item, blamed on its file
        self.clip_len, self.size, self.stride = clip_len, size, stride
        if exclude is not None and not expand_user(exclude).is_dir():
            # A typo (or a path meant inside root) excluded nothing: the held-out videos
            # were trained on without a word.
            raise FileNotFoundError(f"exclude {str(exclude)!r} is not a folder")
        self.files = video_files(self.root, None if exclude is None else Path(exclude))
        if not self.files:
            raise FileNotFoundError(
                f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {str(self.root)!r}"
                + ("" if exclude is None else f" outside {str(exclude)!r}")
            )
        self.clips: list[tuple[int, int]] = []  # (file index, start frame)
        self.infos: list[VideoInfo] = []
        for i, path in enumerate(tqdm(self.files, desc="probing videos", disable=None)):
            info = probe_video(path)  # raises VideoReadError naming a corrupt file
            self.infos.append(info)
            if info.size_changes:
                # Its frames cannot be read as one clip across the change (read_video refuses
                # it): such a clip failed at some later training step, not here.
                log.warning("%s changes frame size midway; skipped", path)
                continue
            if info.num_frames < clip_len:
                log.warning(
                    "%s has %d frames < clip_len=%d; skipped", path, info.num_frames, clip_len
                )
            self.clips.extend((i, s) for s in range(0, info.num_frames - clip_len + 1, stride))
        if not self.clips:
            raise ValueError(
                f"no video under {str(self.root)!r} has clip_len={clip_len} frames of one "
                "frame size"
            )

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        file_index, start = self.clips[index]
        path = self.files[file_index]
        try:
            frames = read_video(
                path, start, self.clip_len, size=self.size, info=self.infos[file_index]
            )
        except VideoReadError:
            raise
        except Exception as err:  # decoding can fail past the probe (e.g. a corrupt packet)
            raise VideoReadError(f"{path}: could not decode frames {start}+: {err}") from err
        return {
            "video": to_model_range(frames),
            "label": torch.tensor(NO_LABEL, dtype=torch.int64),
            "actions": torch.zeros(self.clip_len, dtype=torch.int64),
            "index": torch.tensor(file_index, dtype=torch.int64),
            "start": torch.tensor(start, dtype=torch.int64),
        }

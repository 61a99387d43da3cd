"""The data config and the loaders built from it (``data=bouncing|agent|mix|folder``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vidgen.data.folder import VideoFolder
from vidgen.data.worlds import WORLDS, WorldClips
from vidgen.fsutil import expand_user
from vidgen.validate import check_int, check_number, shown
from vidgen.worlds.agent import POLICIES, AgentWorldConfig
from vidgen.worlds.bouncing import BouncingShapesConfig

log = logging.getLogger(__name__)

SOURCES = (*WORLDS, "mix", "folder")


@dataclass
class DataConfig:
    """Where clips come from and how they are batched.

    ``name`` is the source: a procedural world (``bouncing``, ``agent``), ``mix`` (both, an
    ``agent_fraction`` of AgentWorld clips), or ``folder`` (every video under ``root``; eval
    uses ``eval_root`` when given). ``size`` is the frame size for every source.
    ``num_clips`` (``eval_clips``) is how many clips the train (eval) split has: a world makes
    that many; a folder gives all of its clips up to that many, spread evenly over them.
    """

    name: str = "bouncing"
    clip_len: int = 8
    size: int = 64
    num_clips: int = 100_000
    eval_clips: int = 256
    seed: int = 0
    batch_size: int = 8
    num_workers: int = 0
    root: str | None = None
    eval_root: str | None = None
    stride: int | None = None
    agent_policy: str = "random"
    agent_fraction: float = 0.5
    bouncing: BouncingShapesConfig = field(default_factory=BouncingShapesConfig)
    agent: AgentWorldConfig = field(default_factory=AgentWorldConfig)

    def __post_init__(self) -> None:
        if self.name not in SOURCES:
            raise ValueError(f"data.name must be one of {list(SOURCES)}, got {self.name!r}")
        if self.name == "folder" and not self.root:
            raise ValueError("data=folder needs data.root=<folder of videos>")
        if self.eval_clips < 0:
            raise ValueError(
                f"data.eval_clips must be >= 0 (0: no evaluation), got {self.eval_clips}"
            )
        for name in ("batch_size", "clip_len", "size", "num_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "seed"):
            check_int(f"data.{name}", getattr(self, name), minimum=0)
        if self.seed > 2**64 - 1:  # the loader's torch generator failed, naming no key
            raise ValueError(f"data.seed must be at most 2**64 - 1, got {shown(self.seed)}")
        check_number("data.agent_fraction", self.agent_fraction, minimum=0, maximum=1)
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"data.stride must be >= 1 (or null: clip_len), got {self.stride}")
        for key in ("root", "eval_root", "stride"):
            if self.name != "folder" and getattr(self, key) is not None:
                raise ValueError(
                    f"data.{key} is for data=folder (clips of a folder of videos); "
                    f"data={self.name} makes its clips procedurally and would ignore it"
                )
        # Checked whatever the source (a typo was taken with data=bouncing, to fail only when
        # the same command was run with data=mix).
        if self.agent_policy not in POLICIES:
            raise ValueError(
                f"data.agent_policy must be one of {sorted(POLICIES)}, got {self.agent_policy!r}"
            )
        # One frame size for every source: a world's own size is replaced by data.size, so
        # one set apart from it was ignored without a word.
        for world in ("bouncing", "agent"):
            own = getattr(self, world).size
            default = type(getattr(self, world))().size
            if own not in (default, self.size):
                raise ValueError(
                    f"data.{world}.size={own} is not read: data.size (now {self.size}) is the "
                    "frame size of every source; set data.size instead"
                )


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset of one split (``train`` or ``eval``) of a data config."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "eval" and cfg.eval_clips == 0:
        raise ValueError("data.eval_clips=0 turns evaluation off: there is no eval split")
    if cfg.name == "folder":
        if split == "eval" and not cfg.eval_root:
            log.warning("data.eval_root is not set: evaluating on the training folder")
        root, exclude = folder_split(cfg, split)
        key = "data.eval_root" if split == "eval" and cfg.eval_root else "data.root"
        try:
            folder = VideoFolder(
                root, clip_len=cfg.clip_len, size=cfg.size, stride=cfg.stride, exclude=exclude
            )
        except FileNotFoundError as err:  # a folder without videos: named by its key
            raise FileNotFoundError(f"{key}={str(root)!r}: {err}") from None
        # At most data.num_clips (eval: data.eval_clips) of them, spread evenly: the first
        # ones come mostly from the first video.
        cap = cfg.num_clips if split == "train" else cfg.eval_clips
        if len(folder) <= cap:
            return folder
        log.info(
            "data=folder %s split: %d of its %d clips (data.%s), spread over its videos",
            split,
            cap,
            len(folder),
            "num_clips" if split == "train" else "eval_clips",
        )
        return Subset(folder, spread_indices(len(folder), cap))
    return WorldClips(
        world=cfg.name,
        clip_len=cfg.clip_len,
        num_clips=cfg.num_clips if split == "train" else cfg.eval_clips,
        size=cfg.size,
        seed=cfg.seed,
        split=split,
        bouncing=cfg.bouncing,
        agent=cfg.agent,
        agent_policy=cfg.agent_policy,
        agent_fraction=cfg.agent_fraction,
    )


def spread_indices(available: int, count: int) -> list[int]:
    """``count`` of ``range(available)`` spread evenly (all of them if ``count`` >= it)."""
    if count >= available:
        return list(range(available))
    return [k * available // count for k in range(count)]


def folder_split(cfg: DataConfig, split: str) -> tuple[Path, Path | None]:
    """The folder of a ``data=folder`` split and the folder its videos leave out: the
    training split of a ``data.root`` that holds ``data.eval_root`` (``videos/`` and
    ``videos/val/``) leaves the held-out videos out, instead of training on them. The same
    folder for both, or a training folder inside the held-out one, is refused."""
    key, root = "data.root", expand_user(cfg.root)
    held_out = expand_user(cfg.eval_root) if cfg.eval_root else None
    if split == "eval" and held_out is not None:
        key, root = "data.eval_root", held_out
    if not root.is_dir():
        raise FileNotFoundError(f"{key}={str(root)!r} is not a folder")
    if held_out is not None and not held_out.is_dir():
        # For the training split too: a typo excluded nothing, and with eval_clips=0 (no
        # eval split built) nothing else would have said so.
        raise FileNotFoundError(f"data.eval_root={str(held_out)!r} is not a folder")
    if held_out is None:
        return root, None
    train, evals = expand_user(cfg.root).resolve(), held_out.resolve()
    if train == evals:
        raise ValueError(
            f"data.eval_root is data.root ({cfg.root!r}): the held-out videos would be "
            "trained on; give a folder of other videos, or leave data.eval_root unset"
        )
    if train.is_relative_to(evals):
        raise ValueError(
            f"data.root={cfg.root!r} is inside data.eval_root={cfg.eval_root!r}: every "
            "training video would be held out too"
        )
    # Left out of training wherever it lies: inside data.root, or reached through a link.
    return root, (held_out if split == "train" else None)


def make_loader(cfg: DataConfig, split: str = "train", shuffle: bool | None = None) -> DataLoader:
    """Batches of dicts whose ``video`` is float32 (B, T, 3, H, W) in [-1, 1]. Shuffling is
    seeded by ``cfg.seed``, so an epoch's order is reproducible."""
    dataset = build_dataset(cfg, split)
    train = split == "train"
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train if shuffle is None else shuffle,
        drop_last=train and len(dataset) >= cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )

"""Clip datasets over the procedural worlds.

Item ``i`` is a pure function of (seed, split, i): its world, the world's seed and where in
the world's (unbounded) video the clip starts. A dataset therefore needs no storage, any
worker can make any item, and the ``eval`` split draws its world seeds from a stream of its
own, offset past every 32-bit seed (``EVAL_SEED_OFFSET``): no eval world is a training
world (``item_seed``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from vidgen.validate import check_int, check_number
from vidgen.worlds.agent import POLICIES, AgentWorldConfig, generate_trajectory
from vidgen.worlds.bouncing import MAX_FRAME, BouncingShapes, BouncingShapesConfig

WORLDS = ("bouncing", "agent")
SPLITS = {"train": 0, "eval": 1}
NO_LABEL = -1  # label of clips that have none (AgentWorld, real videos)


# Eval world seeds lie at and above it, train ones below: the splits never share a world (32-bit
# hashes of both splits collided now and then, and an eval clip was then a training clip).
EVAL_SEED_OFFSET = 2**32


# World seeds below it are never drawn by a split: they are the benchmarks' held-out videos
# (tokenizer.py 900000 + i, quality.py 1000 + s, ...). A 32-bit draw landed on one of them
# now and then (about 3% of data seeds at 100,000 clips), and a benchmark video was then a
# training clip.
RESERVED_SEEDS = 2**20


def item_seed(seed: int, split: str, index: int) -> int:
    """The world seed of item ``index`` of a split: independent streams per (seed, split),
    the train split's never below ``RESERVED_SEEDS`` (a draw there takes the stream's next
    word instead), the eval split's offset by ``EVAL_SEED_OFFSET`` (disjoint from every train
    and reserved seed, and unchanged)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    words = np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(8)
    if split == "eval":  # offset past every reserved (and train) seed: the first word
        return int(words[0]) + EVAL_SEED_OFFSET
    drawn = next((int(w) for w in words if w >= RESERVED_SEEDS), None)
    if drawn is None:  # 8 words below 2**20 of 2**32: about 1 in 2**96
        raise RuntimeError(f"no world seed above the reserved ones for item {index}")
    return drawn


def to_model_range(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) in [-1, 1]."""
    if not isinstance(frames, torch.Tensor):
        frames = np.asarray(frames)
    if frames.dtype not in (np.uint8, torch.uint8) or frames.ndim != 4 or frames.shape[-1] != 3:
        # float frames in [0, 1] came out near -1, channels-first ones scrambled
        raise ValueError(
            f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}"
        )
    if isinstance(frames, np.ndarray):
        frames = np.ascontiguousarray(frames)
        if not frames.flags.writeable:  # a request's own context: torch warns of read-only
            frames = frames.copy()
    video = torch.as_tensor(frames)
    return video.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float (..., T, 3, H, W) in [-1, 1] -> uint8 (..., T, H, W, 3); the inverse of
    ``to_model_range`` up to rounding."""
    if not video.is_floating_point() or video.ndim < 3 or video.shape[-3] != 3:
        raise ValueError(
            f"video must be float (..., 3, H, W) in [-1, 1], got {video.dtype} {tuple(video.shape)}"
        )
    frames = video.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.movedim(-3, -1)


class WorldClips(Dataset):
    """Clips of ``clip_len`` frames from BouncingShapes, AgentWorld or a mix of both.

    Each item is a dict: ``video`` float32 (T, 3, H, W) in [-1, 1]; ``label`` int64 (number of
    shapes, or ``NO_LABEL``); ``actions`` int64 (T,), or float32 (T, 2) velocities when the
    AgentWorld config is continuous (action t acts between frame t and t+1; zeros = noop for
    BouncingShapes); ``world`` int64 index into
    ``WORLDS``; ``seed`` int64 world seed; ``start`` int64 first frame index in that world.
    """

    def __init__(
        self,
        world: str = "bouncing",
        clip_len: int = 8,
        num_clips: int = 10_000,
        size: int = 64,
        seed: int = 0,
        split: str = "train",
        bouncing: BouncingShapesConfig | None = None,
        agent: AgentWorldConfig | None = None,
        agent_policy: str = "random",
        agent_fraction: float = 0.5,
        max_start: int = 512,
    ) -> None:
        if world not in (*WORLDS, "mix"):
            raise ValueError(f"world must be one of {[*WORLDS, 'mix']}, got {world!r}")
        clip_len = check_int("clip_len", clip_len, minimum=1)
        num_clips = check_int("num_clips", num_clips, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        max_start = check_int("max_start", max_start, minimum=0)
        if world in ("bouncing", "mix") and max_start + clip_len > MAX_FRAME:
            # Caught here, not in a DataLoader worker at the first late start drawn.
            raise ValueError(
                f"max_start + clip_len must be at most 2**40 (the last frame BouncingShapes "
                f"renders exactly), got max_start={max_start}, clip_len={clip_len}"
            )
        if not 0.0 <= check_number("agent_fraction", agent_fraction) <= 1.0:
            raise ValueError(f"agent_fraction must be in [0, 1], got {agent_fraction}")
        if world in ("agent", "mix") and agent_policy not in POLICIES:
            raise ValueError(
                f"agent_policy must be one of {sorted(POLICIES)}, got {agent_policy!r}"
            )
        item_seed(seed, split, 0)  # validates split
        self.world, self.clip_len, self.num_clips = world, clip_len, num_clips
        self.seed, self.split, self.max_start = seed, split, max_start
        # The dataset's size wins over the worlds' own so that a mix has one frame size; a
        # world that is not used is not resized (it may not fit a small size).
        self.bouncing = bouncing or BouncingShapesConfig()
        self.agent = agent or AgentWorldConfig()
        try:
            if world in ("bouncing", "mix"):
                key = "data.bouncing"
                self.bouncing = dataclasses.replace(self.bouncing, size=size)
            if world in ("agent", "mix"):
                key = "data.agent"
                self.agent = dataclasses.replace(self.agent, size=size)
        except ValueError as err:  # its settings do not fit the dataset's frame size
            raise ValueError(
                f"{key} at data.size={size} (its own size is replaced): {err}"
            ) from err
        self.agent_policy, self.agent_fraction = agent_policy, agent_fraction
        self._action_dtype = np.float32 if self.agent.continuous else np.int64

    def __len__(self) -> int:
        return self.num_clips

    def world_of(self, index: int) -> str:
        if self.world != "mix":
            return self.world
        rng = np.random.default_rng([item_seed(self.seed, self.split, index), 2])
        return "agent" if rng.random() < self.agent_fraction else "bouncing"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"index {index} out of range for {self.num_clips} clips")
        seed = item_seed(self.seed, self.split, index)
        # The worlds draw their own content from `seed`; the item's own draws (start frame)
        # use a separate stream, so they do not correlate with the label. (AgentWorld's random
        # policy happens to be seeded with this same stream, so an agent clip's start frame
        # and its episode's first action are related; harmless, and kept so that the clips
        # of existing runs and caches stay what they were.)
        rng = np.random.default_rng([seed, 1])
        world = self.world_of(index)
        start = int(rng.integers(0, self.max_start + 1))
        if world == "bouncing":
            shapes = BouncingShapes(self.bouncing, seed=seed)
            frames = shapes.trajectory(self.clip_len, start=start).frames
            label = shapes.label
            actions = np.zeros((self.clip_len, 2) if self.agent.continuous else self.clip_len)
        else:
            # AgentWorld is simulated from its start, so clips start within the first 64
            # frames of an episode: that keeps items cheap and the policy's history short.
            start = start % 64
            traj = generate_trajectory(
                self.agent, seed=seed, num_frames=start + self.clip_len, policy=self.agent_policy
            )
            frames, actions, label = traj.frames[start:], traj.actions[start:], NO_LABEL
        return {
            "video": to_model_range(frames),
            "label": torch.tensor(label, dtype=torch.int64),
            "actions": torch.as_tensor(np.asarray(actions, dtype=self._action_dtype)),
            "world": torch.tensor(WORLDS.index(world), dtype=torch.int64),
            "seed": torch.tensor(seed, dtype=torch.int64),
            "start": torch.tensor(start, dtype=torch.int64),
        }

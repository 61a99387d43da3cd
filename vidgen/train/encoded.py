"""Training data encoded once by a frozen tokenizer.

Encoding every batch again would cost as much CPU as the step it feeds, so the clips a
generator (or a latent-space tokenizer) trains on are encoded once, kept in memory and saved
next to the run (a resumed or repeated run loads them instead of encoding again).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vidgen import checkpoint
from vidgen.data import DataConfig, build_dataset
from vidgen.data.folder import video_files
from vidgen.data.loader import folder_split
from vidgen.io import READER_VERSION
from vidgen.tokenizers.kl import KLAutoencoder, KLConfig
from vidgen.train.loop import resolve_device
from vidgen.worlds import WORLDS_VERSION

log = logging.getLogger(__name__)
PROGRESS_EVERY = 60.0  # seconds between progress lines while encoding

# DataConfig fields that change batching or the other split, never the clips of this one.
_NOT_CONTENT = {"batch_size", "num_workers"}
_OTHER_SPLIT = {"train": {"eval_clips", "eval_root"}, "eval": {"num_clips"}}
# Fields a source never reads (a world's clips do not depend on a folder's root, nor a folder's
# on the worlds' settings): a run that changes one of them reuses the cache. The agent config
# stays in a bouncing key: its ``continuous`` decides the dtype of the clips' null actions.
_UNUSED = {
    "bouncing": {"root", "eval_root", "stride", "agent_policy", "agent_fraction"},
    "agent": {"root", "eval_root", "stride", "bouncing", "agent_fraction"},
    "mix": {"root", "eval_root", "stride"},
    "folder": {"seed", "bouncing", "agent", "agent_policy", "agent_fraction"},
}


@dataclass
class EncodedClipsInfo:
    clips: int
    keep_video: bool
    source: str = ""  # the data description the clips were made from (``data_description``)


def data_description(data: DataConfig, split: str) -> str:
    """Every setting of ``data`` that decides the clips of ``split`` (source, clip length,
    size, seed, the worlds' settings and ``WORLDS_VERSION``, folders), as canonical JSON. A
    folder is described by its path and each video's name, size and modification time."""
    if split not in _OTHER_SPLIT:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    fields = asdict(data)
    for name in _NOT_CONTENT | _OTHER_SPLIT[split] | _UNUSED.get(data.name, set()):
        fields.pop(name, None)
    if data.name == "folder":  # the files themselves: a replaced video is other data
        root, exclude = folder_split(data, split)
        stats = [(str(p.relative_to(root)), p.stat()) for p in video_files(root, exclude)]
        fields["files"] = [[name, st.st_size, st.st_mtime_ns] for name, st in stats]
        if split == "eval":  # which clips are held out (held_out_clips)
            fields["eval_pick"] = "spread"
        # At most num_clips (eval_clips) of its clips, spread (build_dataset; until
        # 2026-12-01 every clip, whatever the cap).
        fields["capped"] = "spread"
        # Anamorphic videos read as displayed (``VideoInfo.pixel_aspect``; until 2026-12-01
        # squeezed): their clips changed, and a cache key naming only the files would not say.
        fields["pixel_aspect"] = "applied"
        # Decoded as `read_video` does now: a reader change gives some files other frames.
        fields["reader_version"] = READER_VERSION
    else:  # procedural: the same settings render other frames after a change to the worlds
        fields["worlds_version"] = WORLDS_VERSION
        if split == "eval":  # eval seeds moved past every train seed (EVAL_SEED_OFFSET)
            fields["eval_seeds"] = "offset"
        else:  # train seeds skip the benchmarks' (RESERVED_SEEDS): a few clips changed
            fields["train_seeds"] = "above-reserved"
    return json.dumps({"split": split, **fields}, sort_keys=True)


def cache_path(out: Path, kind: str, encoder_key: str, data: DataConfig, split: str) -> Path:
    """``out/<kind>-<encoder key>-<split>-<data key>-<clips>.safetensors``: the encoder key is
    the frozen tokenizer's ``encoder_fingerprint`` (what decides the codes: a fine-tuned
    decoder keeps the cache, another encoder makes its own); the data key hashes
    ``data_description``, so a run over other data (another clip length, size, seed, world)
    encodes its own clips instead of reading another run's."""
    key = hashlib.sha256(data_description(data, split).encode()).hexdigest()[:10]
    clips = data.num_clips if split == "train" else data.eval_clips
    return out / f"{kind}-{encoder_key[:12]}-{split}-{key}-{clips}.safetensors"


def held_out_clips(data: DataConfig, run_config: object) -> tuple[DataConfig, Dataset] | None:
    """The held-out clips a generator's evaluation reads: ``train.eval_batches`` batches of
    ``data.batch_size``, so only that many eval clips are made and encoded (``data.eval_clips``
    caps them): a world's first ones (each is a world of its own), a folder's spread evenly
    over its clips (``build_dataset``: the first ones came mostly from its first video).
    Returns the data config that names them (its ``eval_clips`` is their number: the cache
    key; which clips they are depends on nothing else) and the clips, or None when
    evaluation is off (``train.eval_batches=0``)."""
    batches = getattr(getattr(run_config, "train", None), "eval_batches", 4)
    if batches <= 0 or data.eval_clips <= 0:  # evaluation off: no eval split to build
        return None
    held = replace(data, eval_clips=min(batches * data.batch_size, data.eval_clips))
    source = build_dataset(held, "eval")
    if len(source) == 0:
        return None
    return replace(held, eval_clips=len(source)), source


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Each batch allocates and frees megabytes of frames while small results stay alive
    between them; glibc's adaptive mmap threshold then serves the frames from the heap, which
    fragments and never shrinks: encoding 6,144 sequences of 32 frames grew the process by
    about 1 MB per sequence (10 GB) without it, and not at all with it."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def encode_device(run_config: object) -> torch.device:
    """Where a run's training data is encoded: its ``train.device`` (auto = CUDA if any)."""
    return resolve_device(getattr(getattr(run_config, "train", None), "device", "cpu"))


@contextlib.contextmanager
def naming(setting: str, value: str) -> Iterator[None]:
    """A checkpoint that cannot be loaded is reported under the setting that named it."""
    try:
        yield
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(f"{setting}={value}: {err}") from err


def load_autoencoder(name_or_path: str) -> tuple[KLAutoencoder, str]:
    """A frozen KL autoencoder and its ``encoder_fingerprint`` (the key of its latents)."""
    ckpt = checkpoint.load(name_or_path, expected_config=KLConfig)
    autoencoder = ckpt.build(KLAutoencoder, KLConfig)
    return autoencoder.eval().requires_grad_(False), autoencoder.encoder_fingerprint()


class EncodedClips(Dataset):
    """The clips of ``source`` encoded by ``encode`` (a frozen tokenizer: video (b, T, 3, H,
    W) -> codes), stored under ``key``. Items: ``key`` codes, ``label``, ``actions`` and, with
    ``keep_video``, the original ``video`` (for evaluating in pixel space).

    ``description`` names the data (``data_description``); a file at ``path`` made from
    other data, or holding another number of clips, is refused rather than trained on.
    Encoding runs on ``device`` (the training device: a GPU encodes in seconds what takes a
    CPU minutes), with ``module`` (the tokenizer ``encode`` uses; a ``KLAutoencoder`` given as
    ``encode`` is its own) moved there for it and back after."""

    def __init__(
        self,
        source: Dataset,
        encode: Callable[[torch.Tensor], torch.Tensor] | KLAutoencoder,
        path: Path,
        batch_size: int = 8,
        keep_video: bool = False,
        key: str = "latents",
        description: str = "",
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        module: torch.nn.Module | None = None,
    ) -> None:
        if isinstance(encode, KLAutoencoder):
            module, encode = encode, encode.encode
        if path.exists():
            try:
                cached = checkpoint.load(path)
            except checkpoint.CheckpointError as err:  # cut by a full disk or a copy
                raise ValueError(f"{err}; delete it to encode the clips again") from None
            info = cached.config_as(EncodedClipsInfo)
            if info.clips != len(source) or (
                description and info.source and info.source != description
            ):
                raise ValueError(
                    f"{path} holds {info.clips} clips of {info.source or 'unrecorded data'}, "
                    f"not the {len(source)} clips of {description or 'this run'}: delete it "
                    "or train in another folder"
                )
            if key not in cached.tensors or (keep_video and "video" not in cached.tensors):
                raise ValueError(f"{path} holds no {key!r}{' or video' * keep_video}")
            tensors = cached.tensors
        else:
            log.info("encoding %d clips (%s) once; later runs load %s", len(source), key, path)
            began = time.monotonic()
            tensors = self._encode(
                source, encode, batch_size, keep_video, key, num_workers, device, module
            )
            log.info("encoded %d clips in %.0f s", len(source), time.monotonic() - began)
            info = EncodedClipsInfo(len(source), keep_video, description)
            checkpoint.save(path, tensors, info, card={"what": f"encoded clips ({key})"})
        self.tensors = tensors

    @staticmethod
    @torch.no_grad()
    def _encode(
        source: Dataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        keep_video: bool,
        key: str,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        module: torch.nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        # Its own generator: iterating a DataLoader otherwise draws its base seed from the
        # global RNG, and a run's initial weights would depend on whether a cache existed.
        loader = DataLoader(
            source,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),
        )
        keys = (key, "label", "actions", *(("video",) if keep_video else ()))
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        home = next(iter(module.parameters())).device if module is not None else None
        if module is not None:
            module.to(device)
        done, told = 0, time.monotonic()
        try:
            for batch in tqdm(loader, desc=f"encoding clips ({key})", disable=None):
                parts[key].append(encode(batch["video"].to(device)).cpu())
                done += len(batch["video"])
                if time.monotonic() - told > PROGRESS_EVERY:  # the bar is off in a log file
                    log.info("encoding clips (%s): %d of %d", key, done, len(source))
                    told = time.monotonic()
                for name in keys[1:]:
                    parts[name].append(batch[name])
                del batch
                _release_freed_memory()
        finally:
            if module is not None:
                module.to(home)
        return {k: torch.cat(v) for k, v in parts.items()}

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

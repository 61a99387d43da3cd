"""Training data encoded once by a frozen tokenizer.

Encoding every batch again would cost as much CPU as the step it feeds, so the clips a
generator (or a latent-space tokenizer) trains on are encoded once, kept in memory and saved
next to the run (a resumed or repeated run loads them instead of encoding again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vidgen import checkpoint
from vidgen.tokenizers.kl import KLAutoencoder, KLConfig


@dataclass
class EncodedClipsInfo:
    clips: int
    keep_video: bool


def load_autoencoder(name_or_path: str) -> tuple[KLAutoencoder, str]:
    """A frozen KL autoencoder and the sha256 of its checkpoint."""
    ckpt = checkpoint.load(name_or_path, expected_config=KLConfig)
    autoencoder = KLAutoencoder(ckpt.config_as(KLConfig))
    ckpt.load_into(autoencoder)
    return autoencoder.eval().requires_grad_(False), ckpt.sha256


class EncodedClips(Dataset):
    """The clips of ``source`` encoded by ``encode`` (a frozen tokenizer: video (b, T, 3, H,
    W) -> codes), stored under ``key``. Items: ``key`` codes, ``label``, ``actions`` and, with
    ``keep_video``, the original ``video`` (for evaluating in pixel space)."""

    def __init__(
        self,
        source: Dataset,
        encode: Callable[[torch.Tensor], torch.Tensor] | KLAutoencoder,
        path: Path,
        batch_size: int = 8,
        keep_video: bool = False,
        key: str = "latents",
    ) -> None:
        if isinstance(encode, KLAutoencoder):
            encode = encode.encode
        if path.exists():
            tensors = checkpoint.load(path).tensors
        else:
            tensors = self._encode(source, encode, batch_size, keep_video, key)
            info = EncodedClipsInfo(len(source), keep_video)
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
    ) -> dict[str, torch.Tensor]:
        loader = DataLoader(source, batch_size=batch_size, shuffle=False)
        keys = (key, "label", "actions", *(("video",) if keep_video else ()))
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for batch in tqdm(loader, desc=f"encoding clips ({key})", disable=None):
            parts[key].append(encode(batch["video"]).cpu())
            for name in keys[1:]:
                parts[name].append(batch[name])
        return {k: torch.cat(v) for k, v in parts.items()}

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

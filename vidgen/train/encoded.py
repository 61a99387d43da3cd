"""Training data encoded once by a frozen tokenizer.

Encoding every batch again would cost as much CPU as the step it feeds, so the clips a
generator (or a latent-space tokenizer) trains on are encoded once, kept in memory and saved
next to the run (a resumed or repeated run loads them instead of encoding again).
"""

from __future__ import annotations

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
    """The clips of ``source`` as latents of a frozen autoencoder. Items: ``latents``
    (T, c, y, x), ``label``, ``actions`` and, with ``keep_video``, the original ``video``
    (for evaluating in pixel space)."""

    def __init__(
        self,
        source: Dataset,
        autoencoder: KLAutoencoder,
        path: Path,
        batch_size: int = 8,
        keep_video: bool = False,
    ) -> None:
        if path.exists():
            tensors = checkpoint.load(path).tensors
        else:
            tensors = self._encode(source, autoencoder, batch_size, keep_video)
            checkpoint.save(
                path,
                tensors,
                EncodedClipsInfo(len(source), keep_video),
                card={"what": "encoded clips"},
            )
        self.tensors = tensors

    @staticmethod
    @torch.no_grad()
    def _encode(
        source: Dataset, autoencoder: KLAutoencoder, batch_size: int, keep_video: bool
    ) -> dict[str, torch.Tensor]:
        loader = DataLoader(source, batch_size=batch_size, shuffle=False)
        keys = ("latents", "label", "actions", *(("video",) if keep_video else ()))
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        device = next(autoencoder.parameters()).device
        for batch in tqdm(loader, desc="encoding clips", disable=None):
            parts["latents"].append(autoencoder.encode(batch["video"].to(device)).cpu())
            for key in keys[1:]:
                parts[key].append(batch[key])
        return {k: torch.cat(v) for k, v in parts.items()}

    def __len__(self) -> int:
        return len(self.tensors["latents"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

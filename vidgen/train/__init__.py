"""Training: the shared loop and the task of each model (``vidgen train ...``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidgen.data import DataConfig
from vidgen.train.loop import StepSampler, Task, TrainConfig, lr_at, train

log = logging.getLogger(__name__)

__all__ = [
    "StepSampler",
    "Task",
    "TrainCommandConfig",
    "TrainConfig",
    "lr_at",
    "run_train",
    "train",
]


@dataclass
class TrainCommandConfig:
    """``vidgen train tokenizer=<preset> | model=<preset> data=<source> train.<key>=...``.
    ``name`` (default: the chosen preset) names the exported file ``<out>/<name>.safetensors``;
    ``out`` defaults to ``runs/<name>``."""

    tokenizer: Any = None
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = ""
    out: str = ""
    frozen_tokenizer: str = ""  # generators: the tokenizer whose latents they model

    def __post_init__(self) -> None:
        if (self.tokenizer is None) == (self.model is None):
            raise ValueError("choose exactly one of tokenizer=<preset> or model=<preset>")


def build_task(cfg: TrainCommandConfig) -> Task:
    from vidgen.models.ca2vdm import Ca2VDMConfig
    from vidgen.models.nbp import NBPConfig
    from vidgen.tokenizers.kl import KLConfig
    from vidgen.tokenizers.larp import LARPConfig
    from vidgen.train.tokenizer import kl_task, larp_task

    target = cfg.tokenizer if cfg.tokenizer is not None else cfg.model
    if isinstance(target, KLConfig):
        return kl_task(target, cfg.data, cfg, cfg.name)
    if isinstance(target, LARPConfig):
        return larp_task(target, cfg.data, cfg, cfg.name, out_dir(cfg))
    if isinstance(target, Ca2VDMConfig):
        from vidgen.train.diffusion import ca2vdm_task

        return ca2vdm_task(
            target, cfg.data, cfg, cfg.name, cfg.frozen_tokenizer or "kl-tiny", out_dir(cfg)
        )
    if isinstance(target, NBPConfig):
        from vidgen.train.tokens import nbp_task

        return nbp_task(
            target, cfg.data, cfg, cfg.name, cfg.frozen_tokenizer or "larp-tiny", out_dir(cfg)
        )
    raise ValueError(f"no training task for {type(target).__name__}")


def run_train(cfg: TrainCommandConfig) -> Path:
    """Train (or resume) and export; returns the exported checkpoint's path."""
    if not cfg.name:
        raise ValueError("name must be set (the CLI fills it from the chosen preset)")
    torch.manual_seed(cfg.train.seed)  # the model's initial weights are part of the run
    return train(build_task(cfg), cfg.train, out_dir(cfg))


def out_dir(cfg: TrainCommandConfig) -> Path:
    return Path(cfg.out or f"runs/{cfg.name}")

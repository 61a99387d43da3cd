"""Training tasks for the tokenizers: the KL autoencoder (and LARP, in larp.py's issue)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vidgen.data import DataConfig, build_dataset
from vidgen.tokenizers.kl import KLAutoencoder, KLConfig
from vidgen.tokenizers.losses import psnr, ssim
from vidgen.train.loop import Task


@torch.no_grad()
def evaluate_kl(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """PSNR and SSIM of deterministic (posterior-mean) reconstructions of held-out clips."""
    model.eval()
    scores = {"psnr": 0.0, "ssim": 0.0}
    for batch in batches:
        video = batch["video"]
        recon = model.decode(model.encode(video)).clamp(-1, 1)
        flat, target = recon.flatten(0, 1), video.flatten(0, 1)
        scores["psnr"] += float(psnr(flat, target)) / len(batches)
        scores["ssim"] += float(ssim(flat, target)) / len(batches)
    model.train()
    return scores


@torch.no_grad()
def fit_latent_scale(model: KLAutoencoder, batches: list[dict[str, torch.Tensor]]) -> KLConfig:
    """Set ``scale`` so that held-out posterior means have unit standard deviation (the
    diffusion model then sees latents of the variance its noise schedule assumes)."""
    model.config.scale = 1.0
    means = torch.cat([model.posterior(b["video"])[0].flatten() for b in batches])
    model.config = dataclasses.replace(model.config, scale=float(1.0 / means.std()))
    return model.config


def kl_task(config: KLConfig, data: DataConfig, run_config: object, name: str) -> Task:
    if data.size != config.image_size:
        raise ValueError(
            f"data.size={data.size} must equal the tokenizer's image_size={config.image_size}"
        )
    return Task(
        name=name,
        model=KLAutoencoder(config),
        loss=lambda model, batch, gen: model(batch["video"], gen),
        train_data=build_dataset(data, "train"),
        eval_data=build_dataset(data, "eval"),
        batch_size=data.batch_size,
        export_config=config,
        run_config=run_config,
        card={
            "what": "per-frame KL autoencoder (8x spatial) for the diffusion family",
            "data": data.name,
            "loss": "L1 + perceptual_weight*(1-SSIM) + grad_weight*L1(image gradients) + "
            "kl_weight*KL",
        },
        evaluate=evaluate_kl,
        before_export=fit_latent_scale,
    )

"""Training tasks for the tokenizers: the KL autoencoder and LARP (optionally with a patch-GAN)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from vidgen import checkpoint
from vidgen.data import DataConfig, build_dataset
from vidgen.tokenizers.gan import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from vidgen.tokenizers.kl import KLAutoencoder, KLConfig
from vidgen.tokenizers.larp import (
    LARPConfig,
    LARPTokenizer,
    codebook_usage,
    prior_cross_entropy,
    unigram_entropy,
)
from vidgen.tokenizers.losses import psnr, ssim
from vidgen.train.encoded import (
    EncodedClips,
    cache_path,
    data_description,
    encode_device,
    held_out_clips,
    load_autoencoder,
    naming,
)
from vidgen.train.loop import Adversary, Task, batch_shares, check_frozen_input

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_kl(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """PSNR and SSIM of deterministic (posterior-mean) reconstructions of held-out clips."""
    was_training = model.training
    model.eval()
    scores = {"psnr": 0.0, "ssim": 0.0}
    try:
        for batch, share in zip(batches, batch_shares(batches), strict=True):
            video = batch["video"]
            recon = model.decode(model.encode(video)).clamp(-1, 1)
            flat, target = recon.flatten(0, 1), video.flatten(0, 1)
            scores["psnr"] += float(psnr(flat, target)) * share
            scores["ssim"] += float(ssim(flat, target)) * share
    finally:
        model.train(was_training)
    return scores


@torch.no_grad()
def fit_latent_scale(model: KLAutoencoder, batches: list[dict[str, torch.Tensor]]) -> KLConfig:
    """Set ``scale`` so that held-out posterior means have unit standard deviation (the
    diffusion model then sees latents of the variance its noise schedule assumes)."""
    if not batches:
        raise ValueError(
            "measuring the latent scale needs held-out batches: train.eval_batches must be >= 1"
        )
    # Replaced, never changed in place: the config object is shared with the run's card.
    model.config = dataclasses.replace(model.config, scale=1.0)
    means = torch.cat([model.posterior(b["video"])[0].flatten() for b in batches])
    model.config = dataclasses.replace(model.config, scale=float(1.0 / means.std()))
    return model.config


def kl_task(config: KLConfig, data: DataConfig, run_config: object, name: str) -> Task:
    train_cfg = getattr(run_config, "train", None)
    frozen = "encoder" in (getattr(run_config, "freeze", None) or [])
    if train_cfg is not None and train_cfg.eval_batches == 0 and not frozen:
        # Checked here, not at export after every step was trained.
        raise ValueError(
            "train.eval_batches must be >= 1 for the KL autoencoder: its latent scale is "
            "measured on held-out batches when it is exported (a decoder fine-tune with "
            "'freeze=[encoder]' keeps its init's scale and needs none)"
        )
    if data.eval_clips == 0 and not frozen:
        raise ValueError(
            "data.eval_clips must be >= 1 for the KL autoencoder: its latent scale is measured "
            "on held-out clips when it is exported (a decoder fine-tune with "
            "'freeze=[encoder]' keeps its init's scale and needs none)"
        )
    if data.size != config.image_size:
        raise ValueError(
            f"data.size={data.size} must equal the tokenizer's image_size={config.image_size}"
        )
    model = KLAutoencoder(config)

    def before_export(shipped: nn.Module, batches: list[dict[str, torch.Tensor]]) -> KLConfig:
        # The trained model, not the shipped (EMA) copy, says what was frozen: with the whole
        # encoder fixed (decoder fine-tuning) the latent space, and the scale its users were
        # trained with, stay as they are; otherwise the scale is measured again.
        if not any(p.requires_grad for p in model.encoder.parameters()):
            return shipped.config
        return fit_latent_scale(shipped, batches)

    return Task(
        name=name,
        model=model,
        loss=lambda model, batch, gen: model(batch["video"], gen),
        train_data=build_dataset(data, "train"),
        # The clips evaluation reads (a folder's spread over its videos; the first ones
        # came from its first videos, and so did the exported latent scale).
        eval_data=held[1] if (held := held_out_clips(data, run_config)) else None,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        export_config=config,
        run_config=run_config,
        card={
            "what": "per-frame KL autoencoder (8x spatial) for the diffusion family",
            "data": data.name,
            "loss": "L1 + perceptual_weight*(1-SSIM) + grad_weight*L1(image gradients) + "
            "kl_weight*KL",
        },
        evaluate=evaluate_kl,
        before_export=before_export,
    )


@torch.no_grad()
def evaluate_larp(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    autoencoder: KLAutoencoder | None = None,
) -> dict[str, float]:
    """Deterministic round trips of held-out clips, scored in pixel space (through the
    frozen autoencoder for a latent-space LARP): PSNR, SSIM, codebook usage, and the prior's
    cross-entropy over the unigram entropy of the codes (< 1: the prior found order)."""
    was_training = model.training
    model.eval()
    scores = {"psnr": 0.0, "ssim": 0.0}
    all_ids = []
    try:
        for batch, share in zip(batches, batch_shares(batches), strict=True):
            inputs = batch["latents"] if autoencoder is not None else batch["video"]
            b, m = inputs.shape[0], inputs.shape[1] // model.config.frames  # m clips in a row
            ids = model.encode(inputs.reshape(b * m, model.config.frames, *inputs.shape[2:]))
            recon = model.decode_video(ids.reshape(b, m, -1))
            if autoencoder is not None:
                recon = autoencoder.to(recon.device).decode(recon).clamp(-1, 1)
            flat, target = recon.flatten(0, 1), batch["video"].flatten(0, 1)
            scores["psnr"] += float(psnr(flat, target)) * share
            scores["ssim"] += float(ssim(flat, target)) * share
            all_ids.append(ids)
        ids = torch.cat(all_ids)
        size = model.config.codebook_size
        scores.update(codebook_usage(ids, size))
        entropy = unigram_entropy(ids, size)
        scores["prior_ce"] = prior_cross_entropy(model, ids)
        scores["unigram_entropy"] = entropy
        scores["prior_ce_over_unigram"] = scores["prior_ce"] / max(entropy, 1e-9)
    finally:
        model.train(was_training)
    return scores


def larp_task(
    config: LARPConfig, data: DataConfig, run_config: object, name: str, out: Path
) -> Task:
    """A latent-space LARP trains on clips encoded once by its frozen autoencoder (cached in
    ``out``); a pixel-space one on the clips themselves."""
    autoencoder, fingerprint, size, key = None, "", config.size, "video"
    if config.autoencoder:
        with naming("tokenizer.autoencoder", config.autoencoder):
            autoencoder, fingerprint = load_autoencoder(config.autoencoder)
        check_frozen_input("autoencoder_fingerprint", fingerprint)  # before encoding
        size, key = autoencoder.config.image_size, "latents"
        latent = (autoencoder.config.latent_channels, autoencoder.config.latent_size)
        if (config.channels, config.size) != latent:
            raise ValueError(
                f"the LARP config's channels={config.channels} and size={config.size} must be "
                f"the latent channels and size of its autoencoder {config.autoencoder!r}: "
                f"{latent[0]} and {latent[1]}"
            )
    elif config.channels != 3:  # on frames: RGB (larp-test is made for a kl-test's latents)
        raise ValueError(
            f"a LARP on frames (no tokenizer.autoencoder) reads 3 channels, got "
            f"tokenizer.channels={config.channels}: set tokenizer.channels=3, or "
            "tokenizer.autoencoder=<a kl checkpoint whose latents it reads>"
        )
    clips = data.clip_len // config.frames
    if data.size != size or data.clip_len != clips * config.frames or clips < 1:
        raise ValueError(
            f"data.size={data.size} and data.clip_len={data.clip_len} must be {size} and the "
            f"tokenizer's frames={config.frames}"
            + (" (or a multiple of it: consecutive clips)" if config.context_decoder else "")
        )
    problem = config.restart_problem()
    if problem is not None:
        raise ValueError(problem)
    if config.context_decoder and clips < 2:
        raise ValueError(
            f"a context decoder (tokenizer.context_decoder=true) trains on consecutive clips: "
            f"data.clip_len={data.clip_len} must be k x frames={config.frames} with k >= 2 "
            "(with one clip its context path is never trained, yet decoding reads it)"
        )
    if clips > 1 and not config.context_decoder:
        raise ValueError(
            f"data.clip_len={data.clip_len} holds {clips} clips of {config.frames} frames: "
            "only a context decoder (tokenizer.context_decoder=true) trains on consecutive clips"
        )
    train_data = build_dataset(data, "train")
    # Only the clips evaluation reads (train.eval_batches batches): over an autoencoder each
    # is encoded and kept with its video, and all data.eval_clips (256) were, for 32 read.
    held = held_out_clips(data, run_config)
    eval_config, eval_data = held if held is not None else (data, None)
    if autoencoder is not None:
        out.mkdir(parents=True, exist_ok=True)
        train_data = EncodedClips(
            train_data,
            autoencoder,
            cache_path(out, "latents", fingerprint, data, "train"),
            description=data_description(data, "train"),
            num_workers=data.num_workers,
            device=encode_device(run_config),
        )
        if eval_data is not None:
            eval_data = EncodedClips(
                eval_data,
                autoencoder,
                # Named apart from a generator's held-out latents, which hold no video.
                cache_path(out, "latents+video", fingerprint, eval_config, "eval"),
                keep_video=True,
                description=data_description(eval_config, "eval"),
                num_workers=data.num_workers,
                device=encode_device(run_config),
            )
    seed = getattr(getattr(run_config, "train", None), "seed", 0)

    def after_step(
        model: nn.Module, step: int, out: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor | None]:
        # Seeded by (seed, step): a resumed run restarts exactly the same codes.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if not model.quantizer.codebook.requires_grad:  # a frozen codebook stays as it is
            return {}
        # >=, not ==: a run resumed with a lower vq_warmup than the step it is at would
        # otherwise never quantise.
        if step + 1 >= config.vq_warmup and not bool(model.quantizer.active):
            # Data-dependent init: codes start on encoder outputs. Only for a model still in
            # its VQ warm-up: a fine-tuned one (``init=``) keeps its trained codebook.
            model.restart_dead_codes(out["z"], gen, everything=True)
            model.quantizer.active.fill_(1)
            return {"quantizer.codebook": None}  # the EMA takes the new codes, not a blend
        elif (
            bool(model.quantizer.active)
            and step + 1 > config.vq_warmup
            and config.restart_every
            and (step + 1) % config.restart_every == 0
        ):
            # The moved codes start afresh: their EMA rows and optimizer moments are reset.
            return {"quantizer.codebook": model.restart_dead_codes(out["z"], gen)}
        return {}

    model = LARPTokenizer(config)
    model.quantizer.active.fill_(int(config.vq_warmup <= 0))
    adversary = larp_adversary(config, autoencoder, key)

    def loss(model: nn.Module, batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict:
        out = model(batch[key], gen)
        if adversary is not None and adversary.active:
            fake = _frames(out["recon"], autoencoder)
            out["gan_g"] = hinge_g_loss(adversary.module(fake))
            out["loss"] = out["loss"] + config.gan_weight * out["gan_g"]
            out["fake"] = fake.detach()
        return out

    def before_export(shipped: nn.Module, batches: list[dict[str, torch.Tensor]]) -> LARPConfig:
        if not bool(shipped.quantizer.active):  # e.g. train.max_seconds ended the run early
            log.warning(
                "exporting in the VQ warm-up (tokenizer.vq_warmup=%d): this tokenizer does "
                "not quantise yet, its ids mean nothing; run again to resume",
                config.vq_warmup,
            )
        if not config.autoencoder:
            return config
        # The exported file names its autoencoder relative to its own folder (as generators
        # name their tokenizer), so it loads from any working directory; the path is not in
        # the encoder fingerprint.
        return dataclasses.replace(
            config, autoencoder=checkpoint.named_from(config.autoencoder, out)
        )

    return Task(
        name=name,
        model=model,
        loss=loss,
        train_data=train_data,
        eval_data=eval_data,
        batch_size=data.batch_size,
        num_workers=0 if autoencoder is not None else data.num_workers,  # encoded: in memory
        export_config=config,
        before_export=before_export,
        run_config=run_config,
        card={
            "what": "LARP-style video tokenizer: holistic queries, stochastic cosine VQ, "
            "jointly trained AR prior (discarded at inference)"
            + (
                f"; over the latents of the frozen {config.autoencoder}"
                if config.autoencoder
                else ""
            ),
            "data": data.name,
            **({"autoencoder_fingerprint": fingerprint} if config.autoencoder else {}),
            "loss": "L1 + mse_weight*MSE + VQ codebook/commitment + prior_weight*prior CE"
            + (
                " + perceptual_weight*(1-SSIM) + grad_weight*L1(gradients)"
                if not config.autoencoder
                else ""
            )
            + (
                f" + {config.gan_weight}*patch-GAN hinge from step {config.gan_start}"
                if adversary is not None
                else "; no GAN"
            ),
        },
        evaluate=lambda model, batches: evaluate_larp(model, batches, autoencoder),
        after_step=after_step,
        adversary=adversary,
    )


def _frames(clips: torch.Tensor, autoencoder: KLAutoencoder | None) -> torch.Tensor:
    """(b, t, c, h, w) clips in the tokenizer's space -> (b t, C, H, W) frames in pixels."""
    if autoencoder is not None:
        clips = autoencoder.to(clips.device).decode(clips)  # it lives outside the model
    return clips.flatten(0, 1)


def larp_adversary(
    config: LARPConfig, autoencoder: KLAutoencoder | None, key: str
) -> Adversary | None:
    """The patch-GAN discriminator of a LARP run (None when ``gan_weight`` is 0): it sees
    frames in pixels, so for a latent-space LARP both the real clips' latents and the
    reconstructions go through the frozen autoencoder's decoder (the real side is then the
    autoencoder's own reconstruction, the best a latent-space tokenizer can reach)."""
    if config.gan_weight == 0:
        return None
    channels = autoencoder.config.in_channels if autoencoder is not None else config.channels
    # Checked now, not when the discriminator first sees frames at gan_start (thousands of
    # steps in, with its weights already in the run's state).
    pixels = autoencoder.config.image_size if autoencoder is not None else config.size
    if pixels < 2**config.disc_layers:
        raise ValueError(
            f"tokenizer.disc_layers={config.disc_layers} stride-2 layers need frames of at "
            f"least {2**config.disc_layers} pixels; this tokenizer's are {pixels}: lower "
            "disc_layers"
        )
    disc = PatchDiscriminator(channels, config.disc_dim, config.disc_layers)

    def disc_loss(
        disc: nn.Module, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        with torch.no_grad():
            real = _frames(batch[key], autoencoder)
        return hinge_d_loss(disc(real), disc(out["fake"]))

    return Adversary(module=disc, loss=disc_loss, start=config.gan_start)

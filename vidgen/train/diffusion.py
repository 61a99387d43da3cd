"""Training the causal video DiT with flow matching over frozen KL latents.

A training sequence is K clips. The model sees [the K clips as context (lightly re-noised at
``prefix_t``); noisy copies of the same K clips], with ``teacher_forcing_mask``: context frames
attend over the banded history of context frames exactly as the cache will hold them, and the
noisy copy of clip k attends to the clean clips in its window plus its own frames causally.
So every noisy clip is trained in exactly the situation inference puts it in — clip 0 with no
context, clip k with min(k, window) clips of context (the prefix lengths are all sampled at
once) — and the loss is on the noisy frames only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vidgen import checkpoint
from vidgen.data import DataConfig, build_dataset
from vidgen.models.ca2vdm import Ca2VDMConfig, CausalVideoDiT, Cond, teacher_forcing_mask
from vidgen.models.nbp import NBPConfig
from vidgen.nn.conditioning import NULL
from vidgen.sampling.flow import add_noise, scale_contrast, velocity_target
from vidgen.tokenizers.kl import foreground_weights
from vidgen.train.encoded import (
    EncodedClips,
    cache_path,
    data_description,
    encode_device,
    held_out_clips,
    load_autoencoder,
    naming,
)
from vidgen.train.loop import Task, batch_shares, check_frozen_input
from vidgen.worlds import NUM_ACTIONS

log = logging.getLogger(__name__)


def leading_actions(actions: torch.Tensor, num_actions: int) -> torch.Tensor:
    """Data actions (action t acts between frame t and t+1) -> the action leading to each
    frame (frame t <- action t-1); a clip's first frame gets the null action."""
    if num_actions:
        null = torch.full_like(actions[:, :1], NULL)
    else:
        null = torch.zeros_like(actions[:, :1])
    return torch.cat([null, actions[:, :-1]], dim=1)


def flow_matching_loss(
    model: CausalVideoDiT,
    latents: torch.Tensor,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
    actions: torch.Tensor | None = None,
    held_out: bool = False,
) -> dict[str, torch.Tensor]:
    """Loss of one batch of clean latent sequences (b, K*clip_len, c, y, x); ``actions`` are
    per frame, the action leading to it. ``held_out``: the situation of inference, for
    evaluation — no condition dropout, every context clip at ``prefix_t``."""
    cfg = model.config
    b, total = latents.shape[:2]
    if total % cfg.clip_len:
        raise ValueError(f"sequence length {total} must be whole clips of {cfg.clip_len}")
    clips, dev = total // cfg.clip_len, latents.device

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=dev, dtype=latents.dtype)

    t_context = torch.full((b, total), cfg.prefix_t, device=dev, dtype=latents.dtype)
    if cfg.context_noise_max and not held_out:  # one level per (sample, context clip)
        u = torch.rand((b, clips), generator=generator, device=dev, dtype=latents.dtype)
        level = cfg.prefix_t + (cfg.context_noise_max - cfg.prefix_t) * u
        t_context = level.repeat_interleave(cfg.clip_len, dim=1)
    context_noise = randn(latents.shape)
    # One flow time per (sample, clip), logit-normal: more weight on the middle of the path.
    t_clip = torch.sigmoid(randn((b, clips)))
    t_frames = t_clip.repeat_interleave(cfg.clip_len, dim=1)  # (b, T)
    noise = randn(latents.shape)
    noisy = add_noise(latents, noise, t_frames)
    drop_label = drop_action = torch.zeros(b, dtype=torch.bool, device=dev)
    if not held_out:
        both = labels is not None and actions is not None
        drop_label, drop_action = condition_drops(cfg, (b,), both, generator, dev)
    ones = torch.ones(b, total, dtype=torch.bool, device=dev)
    positions = torch.arange(total, device=dev).repeat(2).expand(b, -1)
    mask = teacher_forcing_mask(clips, cfg.clip_len, cfg.window_clips, device=dev)

    def predict(context, noisy, t_noisy, drop_label, drop_action):
        cond = Cond(
            t=torch.cat([t_context, t_noisy], dim=1),
            labels=labels,
            actions=None if actions is None else torch.cat([actions, actions], dim=1),
            # Context frames always carry the null label (the cache is label-free); their
            # actions are kept. The noisy frames drop label/actions for guidance.
            drop_label=torch.cat([ones, drop_label[:, None].expand(b, total)], dim=1),
            drop_actions=torch.cat([~ones, drop_action[:, None].expand(b, total)], dim=1),
        )
        return model.forward_history(torch.cat([context, noisy], dim=1), cond, mask, positions)

    clean = latents
    if cfg.context_recycle and not held_out:  # drawn last: off, nothing above changes
        u = torch.rand((b, clips), generator=generator, device=dev, dtype=latents.dtype)
        t_r = (cfg.context_recycle_t * u).repeat_interleave(cfg.clip_len, dim=1)
        noisy_r = add_noise(latents, randn(latents.shape), t_r)
        pick = torch.rand((b, clips), generator=generator, device=dev) < cfg.context_recycle
        with torch.no_grad():  # the model's own estimate of every clip, real context
            no = torch.zeros(b, dtype=torch.bool, device=dev)
            v = predict(add_noise(latents, context_noise, t_context), noisy_r, t_r, no, no)
            own = noisy_r - t_r[..., None, None, None] * v[:, total:].to(latents.dtype)
        pick = pick.repeat_interleave(cfg.clip_len, dim=1)[..., None, None, None]
        clean = torch.where(pick, own, latents)
    if cfg.context_fade and not held_out:  # drawn after the above: off, nothing changes
        u = torch.rand((b, clips), generator=generator, device=dev, dtype=latents.dtype)
        factor = (1 - cfg.context_fade * u).repeat_interleave(cfg.clip_len, dim=1)
        clean = scale_contrast(clean, factor)
    context = add_noise(clean, context_noise, t_context)
    pred = predict(context, noisy, t_frames, drop_label, drop_action)
    target = velocity_target(latents, noise)
    if not cfg.foreground_weight or held_out:  # held out: the plain loss, comparable across runs
        return {"loss": F.mse_loss(pred[:, total:], target)}
    weight = foreground_weights(
        latents.flatten(0, 1), cfg.foreground_weight, cfg.foreground_threshold
    ).view(b, total, 1, *latents.shape[-2:])
    return {"loss": (weight * (pred[:, total:] - target) ** 2).mean()}


AGENT_ACTION_DIM = 2  # AgentWorld's continuous actions: velocities (vx, vy)


def check_actions_fit(config: Ca2VDMConfig | NBPConfig, data: DataConfig) -> None:
    """A generator taking actions must be able to read the ones ``data`` gives (discrete:
    int64 (T,), AgentWorld's 5 or zeros; continuous: float (T, 2) when ``data.agent.continuous``
    and the source is a world; a folder's are zeros): found before anything is encoded,
    rather than at the first step, in the model's own words."""
    continuous = data.agent.continuous and data.name != "folder"
    source = f"data={data.name}" + (
        f" (data.agent.continuous={data.agent.continuous})" if data.name != "folder" else ""
    )
    kind = (
        f"continuous ({AGENT_ACTION_DIM},) actions"
        if continuous
        else "discrete actions"
        + (f" in [0, {NUM_ACTIONS})" if data.name in ("agent", "mix") else " (all 0)")
    )
    given = f"{source} gives {kind}"
    if config.action_dim and (not continuous or config.action_dim != AGENT_ACTION_DIM):
        raise ValueError(
            f"model.action_dim={config.action_dim} needs continuous ({config.action_dim},) "
            f"actions, but {given}: set model.action_dim="
            + (
                f"{AGENT_ACTION_DIM}"
                if continuous
                else "0 (model.num_actions for discrete actions), or train on data=agent "
                "data.agent.continuous=true"
            )
        )
    if config.num_actions:
        if continuous:
            raise ValueError(
                f"model.num_actions={config.num_actions} needs discrete actions, but {given}: "
                f"set model.num_actions=0 model.action_dim={AGENT_ACTION_DIM}, or "
                "data.agent.continuous=false"
            )
        if data.name in ("agent", "mix") and config.num_actions < NUM_ACTIONS:
            raise ValueError(
                f"model.num_actions={config.num_actions} is fewer than the {NUM_ACTIONS} "
                f"actions {source} gives: set model.num_actions="
                f"{NUM_ACTIONS} (or more)"
            )
    if not config.num_actions and not config.action_dim and data.name in ("agent", "mix"):
        # The presets take none: a "world model" trained so ignores its actions, found only
        # when a request with actions is refused.
        log.warning(
            "%s, but the model takes none (model.num_actions=0, model.action_dim=0): it will "
            "ignore them; set model.num_actions=%d (discrete) or model.action_dim=%d with "
            "data.agent.continuous=true to condition on them",
            given,
            NUM_ACTIONS,
            AGENT_ACTION_DIM,
        )


def check_labels_fit(config: Ca2VDMConfig | NBPConfig, data: DataConfig) -> None:
    """A generator with labels must have a class for every label ``data`` gives (the number
    of shapes, for BouncingShapes clips): a larger label became the null label in every
    batch, and those clips trained as unconditional without a word."""
    if not config.num_classes or data.name not in ("bouncing", "mix"):
        return
    shapes = data.bouncing
    most = shapes.num_shapes if shapes.num_shapes is not None else shapes.max_shapes
    if most >= config.num_classes:
        setting = (
            f"data.bouncing.num_shapes={shapes.num_shapes}"
            if shapes.num_shapes is not None
            else f"data.bouncing.max_shapes={shapes.max_shapes}"
        )
        raise ValueError(
            f"model.num_classes={config.num_classes} has labels 0..{config.num_classes - 1}, "
            f"but {setting} gives label {most} (the number of shapes): set "
            f"model.num_classes={most + 1} (or more), or fewer shapes"
        )


def condition_drops(
    config: Ca2VDMConfig | NBPConfig,
    shape: tuple[int, ...],
    both: bool,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which labels and actions training drops (bool ``shape`` each), for classifier-free
    guidance: each at its own rate, and for a model given ``both``, both together at
    ``joint_dropout`` (guidance's unconditional pass; nothing is drawn for it otherwise)."""
    drop_label = torch.rand(shape, generator=generator, device=device) < config.label_dropout
    drop_action = torch.rand(shape, generator=generator, device=device) < config.action_dropout
    if both:
        joint = torch.rand(shape, generator=generator, device=device) < config.joint_dropout
        drop_label, drop_action = drop_label | joint, drop_action | joint
    return drop_label, drop_action


def batch_condition(
    config: Ca2VDMConfig | NBPConfig, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A batch's labels (out-of-range ones -> the null label) and leading actions, as a
    generator's config uses them (None where it has none)."""
    labels = batch["label"] if config.num_classes else None
    if labels is not None:
        labels = torch.where((labels >= 0) & (labels < config.num_classes), labels, NULL)
    actions = None
    if config.num_actions or config.action_dim:
        actions = leading_actions(batch["actions"], config.num_actions)
    return labels, actions


@torch.no_grad()
def evaluate_flow(
    model: CausalVideoDiT, batches: list[dict[str, torch.Tensor]], seed: int = 0
) -> dict[str, float]:
    """Flow-matching loss on held-out sequences in the situation of inference (no condition
    dropout, context at ``prefix_t``), with the same noise and flow times at every call (one
    generator seeded ``seed`` per batch), so the figures of two steps compare;
    ``loss_null_label`` is the same with the label dropped (the gap is what the label tells
    the model)."""
    was_training = model.training
    model.eval()
    cfg = model.config
    names = ("loss", "loss_null_label") if cfg.num_classes else ("loss",)
    scores = dict.fromkeys(names, 0.0)
    try:
        for batch, share in zip(batches, batch_shares(batches), strict=True):
            labels, actions = batch_condition(cfg, batch)
            latents = batch["latents"]
            for name in names:
                gen = torch.Generator(latents.device).manual_seed(seed)
                given = labels if name == "loss" else None
                out = flow_matching_loss(model, latents, gen, given, actions, held_out=True)
                scores[name] += float(out["loss"]) * share
    finally:
        model.train(was_training)
    return scores


SAMPLE_CLIPS = 4


def write_samples(
    model: CausalVideoDiT, autoencoder: nn.Module, step: int, out: Path, steps: int = 12
) -> Path:
    """One mp4 of ``SAMPLE_CLIPS`` clips per label (1-4 for the bouncing models; one
    unconditional video otherwise), side by side: ``<out>/samples/step-<step>.mp4``; a uint8
    (frames, h, w, 3) ``.npy`` instead where PyAV is not installed (a bare CUDA image)."""
    import numpy as np

    from vidgen.fsutil import publish, temp_beside
    from vidgen.generators import GenerationRequest
    from vidgen.generators.diffusion import DiffusionClipGenerator
    from vidgen.io import VideoWriter, video

    cfg = model.config
    labels: list[int | None] = list(range(1, min(cfg.num_classes, 5))) or [None]
    frames = SAMPLE_CLIPS * cfg.clip_len
    actions = None
    if cfg.num_actions:
        actions = np.zeros(frames, dtype=np.int64)  # noop
    elif cfg.action_dim:
        actions = np.zeros((frames, cfg.action_dim), dtype=np.float32)
    device = next(model.parameters()).device
    gen = DiffusionClipGenerator(model, autoencoder, len(labels), device)
    streams = [
        gen.open(
            GenerationRequest(frames=frames, seed=0, label=label, actions=actions, steps=steps)
        )
        for label in labels
    ]
    path = out / "samples" / f"step-{step:06d}.{'mp4' if video.av is not None else 'npy'}"
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = []
    while not streams[0].done:
        chunks.append(np.concatenate([c.frames for c in gen.decode(gen.step(streams))], axis=2))
    if video.av is None:
        tmp = temp_beside(path, suffix=".tmp.npy")
        np.save(tmp, np.concatenate(chunks))
        publish(tmp, path)
    else:
        with VideoWriter(path) as writer:
            for chunk in chunks:
                writer.write(chunk)
    for stream in streams:
        gen.close(stream)
    log.info("samples: %s", path)
    return path


def ca2vdm_task(
    config: Ca2VDMConfig,
    data: DataConfig,
    run_config: object,
    name: str,
    tokenizer: str,
    out: Path,
) -> Task:
    """``data.num_clips`` sequences of ``data.clip_len`` frames are encoded once (cached in
    ``out``, keyed by the tokenizer and the data settings) and the DiT trains on them."""

    if data.clip_len % config.clip_len:
        raise ValueError(
            f"data.clip_len={data.clip_len} must be whole clips of {config.clip_len} frames"
        )
    if data.clip_len < config.window + config.clip_len:
        log.warning(
            "data.clip_len=%d < window + clip = %d: later clips never train with a full "
            "window of context",
            data.clip_len,
            config.window + config.clip_len,
        )
    check_actions_fit(config, data)
    check_labels_fit(config, data)
    with naming("frozen_tokenizer", tokenizer):
        autoencoder, fingerprint = load_autoencoder(tokenizer)
    check_frozen_input("tokenizer_fingerprint", fingerprint)  # before any clip is encoded
    if autoencoder.config.image_size != data.size:
        raise ValueError(f"data.size={data.size} must equal the autoencoder's image_size")
    ours = (config.latent_channels, config.latent_size)
    theirs = (autoencoder.config.latent_channels, autoencoder.config.latent_size)
    if ours != theirs:
        raise ValueError(
            f"model.latent_channels and model.latent_size must be the latent channels and "
            f"size of the autoencoder {tokenizer!r}: got {ours}, expected {theirs}"
        )
    model = CausalVideoDiT(config)

    out.mkdir(parents=True, exist_ok=True)
    encoded = EncodedClips(
        build_dataset(data, "train"),
        autoencoder,
        cache_path(out, "latents", fingerprint, data, "train"),
        description=data_description(data, "train"),
        num_workers=data.num_workers,
        device=encode_device(run_config),
    )

    eval_data = None
    if (held := held_out_clips(data, run_config)) is not None:
        eval_data = EncodedClips(
            held[1],
            autoencoder,
            cache_path(out, "latents", fingerprint, held[0], "eval"),
            description=data_description(held[0], "eval"),
            num_workers=data.num_workers,
            device=encode_device(run_config),
        )

    def loss(model: nn.Module, batch: dict[str, torch.Tensor], gen: torch.Generator):
        labels, actions = batch_condition(config, batch)
        return flow_matching_loss(model, batch["latents"], gen, labels, actions)

    return Task(
        name=name,
        model=model,
        loss=loss,
        train_data=encoded,
        eval_data=eval_data,
        batch_size=data.batch_size,
        export_config=config,
        run_config=run_config,
        evaluate=evaluate_flow,
        samples=lambda m, step, folder: write_samples(m, autoencoder, step, folder),
        card={
            "what": "Ca2-VDM-style causal video DiT (flow matching, velocity prediction) with "
            "context K/V cached once and shared by all denoising steps",
            "data": data.name,
            "tokenizer": checkpoint.named_from(tokenizer, out),  # the export is in out
            "tokenizer_fingerprint": fingerprint,
            "label": "number of shapes (BouncingShapes)" if config.num_classes else None,
        },
    )

"""Training the next-block transformer on LARP tokens of consecutive clips.

Clips are tokenised once by the frozen LARP (cached next to the run); a training sequence is
``data.clip_len / frames`` consecutive clips, and the loss is next-block cross-entropy over
the whole sequence under the banded block-causal mask, the same forward the cached inference
is tested against.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vidgen import checkpoint
from vidgen.data import DataConfig, build_dataset
from vidgen.models.nbp import ClipCond, NBPConfig, NextBlockTransformer, nbp_loss
from vidgen.tokenizers.larp import LARPVideoTokenizer
from vidgen.train.diffusion import (
    batch_condition,
    check_actions_fit,
    check_labels_fit,
    condition_drops,
)
from vidgen.train.encoded import (
    EncodedClips,
    cache_path,
    data_description,
    encode_device,
    held_out_clips,
    naming,
)
from vidgen.train.loop import Task, batch_shares, check_frozen_input

log = logging.getLogger(__name__)


def clip_tokens(tokenizer: LARPVideoTokenizer, video: torch.Tensor) -> torch.Tensor:
    """(b, K*frames, 3, H, W) -> (b, K*N): each clip of ``frames`` tokenised on its own."""
    frames = tokenizer.config.frames
    b = video.shape[0]
    clips = video.reshape(b * (video.shape[1] // frames), frames, *video.shape[2:])
    return tokenizer.encode(clips).reshape(b, -1)


def clip_condition(
    config: NBPConfig, batch: dict[str, torch.Tensor], clips: int, gen: torch.Generator | None
) -> ClipCond:
    """A batch's condition as the model uses it (``batch_condition``); with ``gen``, labels
    and actions dropped per sequence at the config's rates (training), without it none
    dropped (evaluation).

    Per sequence, not per clip: guidance's unconditional pass runs on a history in which
    every clip dropped them (its own cache slot), and a clip whose label is dropped while
    its context's is not can read the label from the context, so per-clip drops would
    almost never train that pass (all of 4 clips dropped at rate 0.1: 1 in 10,000)."""
    b, dev = batch["tokens"].shape[0], batch["tokens"].device
    labels, actions = batch_condition(config, batch)
    drop_label = drop_actions = torch.zeros(b, clips, dtype=torch.bool, device=dev)
    if gen is not None:
        both = labels is not None and actions is not None
        drop_label, drop_actions = condition_drops(config, (b, 1), both, gen, dev)
        drop_label, drop_actions = drop_label.repeat(1, clips), drop_actions.repeat(1, clips)
    return ClipCond(labels, actions, drop_label, drop_actions)


@torch.no_grad()
def evaluate_nbp(
    model: NextBlockTransformer, batches: list[dict[str, torch.Tensor]], clips: int
) -> dict[str, float]:
    """Next-block cross-entropy (nats per token) on held-out token sequences, nothing
    dropped and no token noise; ``ce_null_label`` is the same with the label dropped (the
    gap is what the label tells the model)."""
    was_training = model.training
    model.eval()
    cfg = model.config
    scores = {"ce": 0.0}
    try:
        for batch, share in zip(batches, batch_shares(batches), strict=True):
            tokens = batch["tokens"].long()
            cond = clip_condition(cfg, batch, clips, None)
            scores["ce"] += float(nbp_loss(model, tokens, cond)) * share
            if cfg.num_classes:
                cond.drop_label = torch.ones_like(cond.drop_label)
                null = float(nbp_loss(model, tokens, cond)) * share
                scores["ce_null_label"] = scores.get("ce_null_label", 0.0) + null
    finally:
        model.train(was_training)
    return scores


def nbp_task(
    config: NBPConfig, data: DataConfig, run_config: object, name: str, tokenizer: str, out: Path
) -> Task:
    check_actions_fit(config, data)
    check_labels_fit(config, data)
    with naming("frozen_tokenizer", tokenizer):
        larp = LARPVideoTokenizer.from_pretrained(tokenizer)
    if data.clip_len % larp.config.frames:
        raise ValueError(
            f"data.clip_len={data.clip_len} must be whole clips of {larp.config.frames} frames"
        )
    if data.clip_len < config.window + config.frames_per_clip:  # as the DiT's task warns
        log.warning(
            "data.clip_len=%d < window + clip = %d: later clips never train with a full "
            "window of context",
            data.clip_len,
            config.window + config.frames_per_clip,
        )
    size = larp.autoencoder.config.image_size if larp.autoencoder else larp.config.size
    if data.size != size:  # found only once the first batch was encoded, without the key
        raise ValueError(f"data.size={data.size} must equal the tokenizer's frame size {size}")
    ours = (config.tokens_per_clip, config.vocab, config.frames_per_clip)
    theirs = (larp.config.num_tokens, larp.config.codebook_size, larp.config.frames)
    if ours != theirs:
        raise ValueError(
            "model.tokens_per_clip, model.vocab and model.frames_per_clip must be the "
            f"tokenizer's num_tokens, codebook_size and frames: got {ours}, the tokenizer "
            f"{tokenizer!r} has {theirs}"
        )
    # The tokens depend on the LARP's encoder and on the autoencoder it loads (by name or
    # path, so that file can change under it): its fingerprint covers both.
    fingerprint = larp.encoder_fingerprint()
    check_frozen_input("tokenizer_fingerprint", fingerprint)  # before any clip is encoded
    out.mkdir(parents=True, exist_ok=True)
    encoded = EncodedClips(
        build_dataset(data, "train"),
        lambda video: clip_tokens(larp, video),
        cache_path(out, "tokens", fingerprint, data, "train"),
        key="tokens",
        description=data_description(data, "train"),
        num_workers=data.num_workers,
        device=encode_device(run_config),
        module=larp,
    )
    eval_data = None
    if (held := held_out_clips(data, run_config)) is not None:
        eval_data = EncodedClips(
            held[1],
            lambda video: clip_tokens(larp, video),
            cache_path(out, "tokens", fingerprint, held[0], "eval"),
            key="tokens",
            description=data_description(held[0], "eval"),
            num_workers=data.num_workers,
            device=encode_device(run_config),
            module=larp,
        )
    clips = data.clip_len // larp.config.frames

    def loss(model: nn.Module, batch: dict[str, torch.Tensor], gen: torch.Generator):
        cond = clip_condition(config, batch, clips, gen)
        return {"loss": nbp_loss(model, batch["tokens"].long(), cond, gen)}

    return Task(
        name=name,
        model=NextBlockTransformer(config),
        loss=loss,
        train_data=encoded,
        eval_data=eval_data,
        batch_size=data.batch_size,
        export_config=config,
        run_config=run_config,
        evaluate=lambda model, batches: evaluate_nbp(model, batches, clips),
        card={
            "what": "NBP-style next-block-prediction transformer over LARP tokens "
            f"(block {config.block}, window {config.window} frames)",
            "data": data.name,
            "tokenizer": checkpoint.named_from(tokenizer, out),  # the export is in out
            "tokenizer_fingerprint": fingerprint,
            "label": "number of shapes (BouncingShapes)" if config.num_classes else None,
        },
    )

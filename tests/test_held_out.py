"""Held-out evaluation of the generators while they train: the inference situation (nothing
dropped, no training noise), the same draws at every call, and only the clips it reads."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vidgen import checkpoint
from vidgen.data import DataConfig
from vidgen.models.ca2vdm import CA2VDM_CONFIGS, CausalVideoDiT
from vidgen.models.nbp import NBP_CONFIGS, ClipCond, NextBlockTransformer
from vidgen.nn import randomize_
from vidgen.train.diffusion import evaluate_flow, flow_matching_loss
from vidgen.train.encoded import held_out_clips
from vidgen.train.tokens import evaluate_nbp


def dit(**changes) -> CausalVideoDiT:
    torch.manual_seed(0)
    cfg = dataclasses.replace(CA2VDM_CONFIGS["test"], num_actions=0, **changes)
    return randomize_(CausalVideoDiT(cfg), std=0.1).train()


def latent_batch(cfg, b: int = 2, clips: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (b, clips * cfg.clip_len, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return {"latents": torch.randn(shape, generator=gen), "label": torch.tensor([1, 3])}


def test_flow_evaluation_is_the_inference_situation_with_fixed_draws():
    model = dit()
    batches = [latent_batch(model.config)]
    first = evaluate_flow(model, batches)
    assert model.training  # the mode it was given back
    assert evaluate_flow(model, batches) == first  # the same noise and times every call
    assert first["loss"] > 0 and first["loss"] != first["loss_null_label"]
    # It is the loss with the label kept, from a generator seeded 0 ...
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        manual = flow_matching_loss(
            model.eval(), batches[0]["latents"], gen, batches[0]["label"], held_out=True
        )
    assert first["loss"] == pytest.approx(float(manual["loss"]), rel=1e-6)
    # ... and training's dropout and context noise are off: a model that always drops the
    # label and noises its context heavily in training scores the same held out.
    noisy = dit(label_dropout=1.0, context_noise_max=0.9)
    noisy.load_state_dict(model.state_dict())
    assert evaluate_flow(noisy, batches) == first
    # Whereas the training loss of that model does see them.
    with torch.no_grad():
        trained = flow_matching_loss(
            noisy.eval(),
            batches[0]["latents"],
            torch.Generator().manual_seed(0),
            batches[0]["label"],
        )
    assert float(trained["loss"]) != pytest.approx(first["loss"], rel=1e-6)


def test_nbp_evaluation_is_plain_cross_entropy_with_the_label_kept():
    cfg = dataclasses.replace(NBP_CONFIGS["test"], num_actions=0)
    torch.manual_seed(0)
    model = randomize_(NextBlockTransformer(cfg), std=0.1).train()
    clips = 2
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab, (2, clips * cfg.tokens_per_clip), generator=gen)
    labels = torch.tensor([1, 2])
    batches = [{"tokens": tokens.int(), "label": labels}]
    scores = evaluate_nbp(model, batches, clips)
    assert model.training
    keep = torch.zeros(2, clips, dtype=torch.bool)
    with torch.no_grad():
        logits = model.eval()(tokens, ClipCond(labels, None, keep, keep))
        null = model(tokens, ClipCond(labels, None, ~keep, keep))
    assert scores["ce"] == pytest.approx(
        float(F.cross_entropy(logits.flatten(0, 1), tokens.flatten())), rel=1e-6
    )
    assert scores["ce_null_label"] == pytest.approx(
        float(F.cross_entropy(null.flatten(0, 1), tokens.flatten())), rel=1e-6
    )
    assert scores["ce"] != scores["ce_null_label"]
    # Token noise is a training augmentation: evaluation reads the clean tokens.
    noisy = NextBlockTransformer(dataclasses.replace(cfg, token_noise=0.5))
    noisy.load_state_dict(model.state_dict())
    assert evaluate_nbp(noisy, batches, clips) == scores


def test_held_out_clips_are_only_those_evaluation_reads():
    data = DataConfig(name="bouncing", clip_len=8, size=32, batch_size=3, eval_clips=256)
    run = SimpleNamespace(train=SimpleNamespace(eval_batches=2))
    held_data, clips = held_out_clips(data, run)
    assert held_data.eval_clips == len(clips) == 6  # 2 batches of 3, not 256
    assert held_data.num_clips == data.num_clips and held_data.batch_size == 3
    capped = held_out_clips(dataclasses.replace(data, eval_clips=4), run)
    assert capped[0].eval_clips == len(capped[1]) == 4
    assert held_out_clips(data, SimpleNamespace(train=SimpleNamespace(eval_batches=0))) is None


def test_a_folders_held_out_clips_are_spread_over_its_videos(tmp_path):
    """The first clips of a folder's eval split came mostly from its first video; they are
    spread evenly over all of them, and the cache key says so (a cache of the first ones
    is not read for them)."""
    import numpy as np

    from vidgen.data import build_dataset
    from vidgen.io import VideoWriter
    from vidgen.train.encoded import data_description

    for name in ("a", "b", "c"):
        with VideoWriter(tmp_path / f"{name}.mp4", lossless=True) as writer:
            writer.write(np.zeros((32, 16, 16, 3), dtype=np.uint8))
    data = DataConfig(name="folder", root=str(tmp_path), clip_len=4, size=16, batch_size=3)
    run = SimpleNamespace(train=SimpleNamespace(eval_batches=1))
    _, clips = held_out_clips(data, run)
    videos = [int(clips[i]["index"]) for i in range(len(clips))]
    assert sorted(videos) == [0, 1, 2]  # one clip of each of the 3 videos (8 clips each)
    assert '"eval_pick": "spread"' in data_description(data, "eval")
    world = DataConfig(name="bouncing", clip_len=8, size=32, batch_size=3, eval_clips=256)
    firsts = [int(c["seed"]) for c in held_out_clips(world, run)[1]]  # a world's: its first
    assert firsts == [int(build_dataset(world, "eval")[i]["seed"]) for i in range(3)]
    # The clips held out depend only on their number, which names the cache: a larger
    # data.eval_clips picked other clips under the same cache file.
    for cap in (4, 10, 20):
        held, picked = held_out_clips(dataclasses.replace(data, eval_clips=cap), run)
        assert held.eval_clips == 3
        assert [int(picked[i]["index"]) for i in range(3)] == [0, 1, 2]
        assert [int(picked[i]["start"]) for i in range(3)] == [
            int(clips[i]["start"]) for i in range(3)
        ]
    assert "eval_pick" not in data_description(world, "eval")
    # The KL's evaluation (and the latent scale measured on it) read the eval split's first
    # clips: on a folder, its first videos' (here all three from video 0).
    from vidgen.tokenizers.kl import KL_CONFIGS
    from vidgen.train.tokenizer import kl_task

    kl = dataclasses.replace(KL_CONFIGS["test"], image_size=16)
    task = kl_task(kl, dataclasses.replace(data, eval_clips=24), run, "kl")
    assert sorted(int(task.eval_data[i]["index"]) for i in range(3)) == [0, 1, 2]


def test_a_folder_gives_at_most_num_clips_spread_over_its_videos(tmp_path):
    """``data.num_clips`` (eval: ``data.eval_clips``) caps a folder's clips as it sizes a
    world's: it was ignored (every clip encoded) though it named the cache file."""
    import numpy as np

    from vidgen.data import build_dataset
    from vidgen.io import VideoWriter
    from vidgen.train.encoded import data_description

    for name in ("a", "b", "c"):
        with VideoWriter(tmp_path / f"{name}.mp4", lossless=True) as writer:
            writer.write(np.zeros((32, 16, 16, 3), dtype=np.uint8))
    data = DataConfig(name="folder", root=str(tmp_path), clip_len=4, size=16, num_clips=6)
    train = build_dataset(data, "train")
    assert len(train) == 6  # of 24 (8 per video), two of each video
    assert sorted(int(train[i]["index"]) for i in range(6)) == [0, 0, 1, 1, 2, 2]
    assert len(build_dataset(dataclasses.replace(data, num_clips=100), "train")) == 24
    assert len(build_dataset(dataclasses.replace(data, eval_clips=3), "eval")) == 3
    assert '"capped": "spread"' in data_description(data, "train")
    assert '"pixel_aspect": "applied"' in data_description(data, "eval")


def test_generator_training_logs_held_out_figures(tmp_path):
    """A short ca2vdm run evaluates at eval_every and at export: its card and history carry
    the held-out loss, and the eval clips encoded are the one batch evaluation reads."""
    from tests.test_train import SMALL_BOUNCING, make_autoencoder, train

    kl = make_autoencoder(tmp_path)
    overrides = [
        "model=ca2vdm-test",
        *SMALL_BOUNCING,
        "data.clip_len=6",
        "data.num_clips=4",
        f"frozen_tokenizer={kl}",
        "model.num_actions=0",
    ]
    path = train(overrides, tmp_path / "run", 2)
    card = checkpoint.load(path).card
    assert set(card["eval"]) == {"loss", "loss_null_label"} and card["eval"]["loss"] > 0
    assert [h["step"] for h in card["history"] if "eval_loss" in h] == [2]
    assert [p.name.split("-")[-1] for p in (tmp_path / "run").glob("latents-*-eval-*")] == [
        "2.safetensors"
    ]


def test_held_out_scores_weigh_each_batch_by_its_clips_and_keep_the_mode():
    """A short last batch (eval clips not a multiple of the batch size) counted as much as a
    full one; and the tokenizers' evaluations left the (eval-mode) EMA copy in train mode."""
    from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder
    from vidgen.tokenizers.larp import LARP_CONFIGS, LARPTokenizer
    from vidgen.train.tokenizer import evaluate_kl, evaluate_larp

    gen = torch.Generator().manual_seed(0)
    kl = randomize_(KLAutoencoder(KL_CONFIGS["test"]), seed=2, std=0.1).eval()
    size = KL_CONFIGS["test"].image_size
    video = torch.rand(3, 2, 3, size, size, generator=gen) * 2 - 1
    larp_cfg = LARP_CONFIGS["test"]
    larp = randomize_(LARPTokenizer(larp_cfg), seed=1, std=0.1).eval()
    shape = (3, larp_cfg.frames, larp_cfg.channels, larp_cfg.size, larp_cfg.size)
    latents = torch.randn(shape, generator=gen)
    pixels = torch.rand(3, larp_cfg.frames, 3, size, size, generator=gen) * 2 - 1
    nbp_cfg = dataclasses.replace(NBP_CONFIGS["test"], num_actions=0)
    nbp = randomize_(NextBlockTransformer(nbp_cfg), seed=1, std=0.1).eval()
    tokens = torch.randint(0, nbp_cfg.vocab, (3, 2 * nbp_cfg.tokens_per_clip), generator=gen)
    labels = torch.tensor([1, 2, 3])
    cases = [
        (kl, lambda m, bs: evaluate_kl(m, bs), {"video": video}, ("psnr", "ssim")),
        (
            larp,
            lambda m, bs: evaluate_larp(m, bs, kl),
            {"latents": latents, "video": pixels},
            ("psnr", "ssim"),
        ),
        (nbp, lambda m, bs: evaluate_nbp(m, bs, 2), {"tokens": tokens, "label": labels}, ("ce",)),
    ]
    for model, evaluate, batch, keys in cases:
        full = {k: v[:2] for k, v in batch.items()}
        short = {k: v[2:] for k, v in batch.items()}
        both = evaluate(model, [full, short])
        assert not model.training  # given back in the mode it came in
        one, two = evaluate(model, [full]), evaluate(model, [short])
        for key in keys:
            assert one[key] != pytest.approx(two[key])  # non-trivial: the batches differ
            assert both[key] == pytest.approx((2 * one[key] + two[key]) / 3, rel=1e-6)
    model = dit()
    latent = latent_batch(model.config, b=3)
    latent["label"] = torch.tensor([1, 3, 2])
    full = {k: v[:2] for k, v in latent.items()}
    short = {k: v[2:] for k, v in latent.items()}
    # One generator seeded per batch: the draws of a batch of 2 begin those of a batch of 3.
    one, two = evaluate_flow(model, [full]), evaluate_flow(model, [short])
    assert evaluate_flow(model, [full, short])["loss"] == pytest.approx(
        (2 * one["loss"] + two["loss"]) / 3, rel=1e-6
    )

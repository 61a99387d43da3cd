"""LARP tokenizer invariants (DESIGN.md section 4, item 4); test size, every weight random."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vidgen import checkpoint
from vidgen.nn import randomize_
from vidgen.tokenizers.larp import (
    LARP_CONFIGS,
    NO_CONTEXT,
    LARPConfig,
    LARPTokenizer,
    prior_cross_entropy,
)

CFG = LARP_CONFIGS["test"]


def clip(batch: int = 2, seed: int = 0, cfg: LARPConfig = CFG) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.frames, cfg.channels, cfg.size, cfg.size)
    return torch.rand(shape, generator=g) * 2 - 1


def model(cfg: LARPConfig = CFG, seed: int = 1) -> LARPTokenizer:
    return randomize_(LARPTokenizer(cfg), seed=seed, std=0.1).eval()


@pytest.mark.parametrize("tokens", [4, 8, 24])
def test_any_token_count_gives_that_many_ids_in_range(tokens):
    cfg = dataclasses.replace(CFG, num_tokens=tokens)
    ids = model(cfg).encode(clip(cfg=cfg))
    assert ids.shape == (2, tokens) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < cfg.codebook_size
    assert model(cfg).decode(ids).shape == (2, cfg.frames, cfg.channels, cfg.size, cfg.size)


def test_eval_encode_is_deterministic_and_the_nearest_codeword():
    m = model()
    video = clip()
    ids = m.encode(video)
    assert torch.equal(ids, m.encode(video))
    with torch.no_grad():
        z = F.normalize(m.embed(video), dim=-1)
        sims = z @ F.normalize(m.quantizer.codebook, dim=-1).t()  # cosine, not raw dot
    assert torch.equal(ids, sims.argmax(-1))
    assert ids.unique().numel() > 1  # non-trivial: several codes in use


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_value_is_the_codeword_and_passes_gradients(dtype):
    """Exactly the codeword: z + (code - z).detach() rounded twice (3e-8 off in float32, 2e-3
    in bfloat16), so training's decoder read other values than decoding the ids does."""
    m = model()
    m.quantizer.to(dtype)
    torch.manual_seed(0)
    z = torch.randn(3, 50, CFG.code_dim, dtype=dtype, requires_grad=True)
    ids, q = m.quantizer(z, torch.Generator().manual_seed(0))  # stochastic (training) path
    assert torch.equal(q, m.quantizer.codes()[ids].to(dtype))
    q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_a_larp_over_3_channel_latents_is_not_clamped_as_pixels():
    """channels == 3 was taken for pixel space: a LARP over a 3-channel autoencoder's latents
    had its decodes clamped to [-1, 1] and could not be loaded with its autoencoder."""
    from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder
    from vidgen.tokenizers.larp import LARPVideoTokenizer

    kl_cfg = dataclasses.replace(KL_CONFIGS["test"], latent_channels=3)
    autoencoder = randomize_(KLAutoencoder(kl_cfg), seed=2, std=0.1)
    cfg = dataclasses.replace(CFG, channels=3, size=kl_cfg.latent_size, autoencoder="kl-x")
    larp = randomize_(LARPTokenizer(cfg), seed=1, std=1.0).eval()
    ids = larp.encode(clip(cfg=cfg))
    decoded = larp.decode(ids)
    with torch.no_grad():
        assert torch.equal(decoded, larp.decode_codes(larp.quantizer.codes()[ids]))
    assert decoded.abs().max() > 1  # latents are not bounded (non-trivial: not clamped)
    assert LARPVideoTokenizer(larp, autoencoder).autoencoder is autoencoder
    pixels = dataclasses.replace(cfg, autoencoder="")  # on frames: clamped, no autoencoder
    assert randomize_(LARPTokenizer(pixels), seed=1, std=1.0).decode(ids).abs().max() <= 1
    with pytest.raises(ValueError, match="a pixel one none"):
        LARPVideoTokenizer(LARPTokenizer(pixels), autoencoder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_tokens": 8.5}, r"num_tokens must be an int >= 1, got 8.5 \(float\)"),
        ({"num_tokens": True}, r"num_tokens must be an int >= 1, got True \(bool\)"),
        ({"num_tokens": 0}, "num_tokens must be >= 1, got 0"),
        ({"codebook_size": 64.0}, r"codebook_size must be an int >= 2, got 64.0 \(float\)"),
        ({"codebook_size": 1}, "codebook_size must be >= 2, got 1"),
    ],
)
def test_token_and_codebook_counts_must_be_ints(change, message):
    """8.5 tokens or 64.0 codes passed and failed inside torch when the model was made."""
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **change)


def test_decode_video_names_ids_of_the_wrong_shape():
    m = model()
    ids = m.encode(clip())
    assert m.decode_video(ids[:, None]).shape == (2, CFG.frames, CFG.channels, CFG.size, CFG.size)
    with pytest.raises(
        ValueError, match=r"ids must be integer \(batch, clips, num_tokens=8\).* \(2, 8\)"
    ):
        m.decode_video(ids)


def test_stochastic_sampling_follows_the_generator():
    m = model()
    z = torch.randn(64, CFG.code_dim)
    tau = m.quantizer.tau = 1.0  # flat enough that a draw is rarely the argmax
    a, _ = m.quantizer(z, torch.Generator().manual_seed(3))
    b, _ = m.quantizer(z, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    other, _ = m.quantizer(z, torch.Generator().manual_seed(4))
    nearest, _ = m.quantizer(z)
    assert not torch.equal(a, other)
    assert (a != nearest).float().mean() > 0.5  # sampled, not the argmax
    # The draws are softmax(cos / tau) sampled with the given generator, nothing else.
    with torch.no_grad():
        cos = F.normalize(z, dim=-1) @ F.normalize(m.quantizer.codebook, dim=-1).t()
    expected = torch.multinomial(
        (cos / tau).softmax(-1), 1, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, expected[:, 0])


def test_prior_position_i_ignores_tokens_after_i():
    m = model()
    ids = m.encode(clip())
    with torch.no_grad():
        base = m.prior_logits(ids)
        for j in (0, 3, CFG.num_tokens - 1):
            changed = ids.clone()
            changed[:, j] = (changed[:, j] + 1) % CFG.codebook_size
            out = m.prior_logits(changed)
            # Position i predicts token i from tokens < i: positions <= j are unchanged.
            assert torch.equal(out[:, : j + 1], base[:, : j + 1]), j
            if j + 1 < CFG.num_tokens:
                assert (out[:, j + 1 :] - base[:, j + 1 :]).abs().max() > 1e-4


def test_forward_reports_losses_and_metrics():
    m = model().train()
    out = m(clip(), torch.Generator().manual_seed(0))
    for key in ("loss", "l1", "mse", "prior_ce", "perplexity", "dead_codes"):
        assert torch.isfinite(out[key]).all(), key
    out["loss"].backward()
    assert m.quantizer.codebook.grad is not None


def test_dead_code_restart_moves_codes_onto_encoder_outputs():
    m = model()
    m.quantizer.usage.zero_()
    m.quantizer.usage[:3] = 1 / 3
    z = F.normalize(torch.randn(10, CFG.code_dim), dim=-1)
    moved = m.restart_dead_codes(z, torch.Generator().manual_seed(0))
    assert moved.tolist() == list(range(3, CFG.codebook_size))
    sims = m.quantizer.codes()[3:] @ z.t()
    assert (sims.max(dim=1).values > 0.99).all()


def test_a_test_model_overfits_one_clip():
    torch.manual_seed(0)
    m = LARPTokenizer(CFG).train()
    video = clip(batch=1, seed=4) * 0.5
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for step in range(300):
        out = m(video, gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if step == 0:
            m.restart_dead_codes(out["z"], torch.Generator().manual_seed(1), everything=True)
            first = out["l1"].item()
    m.eval()
    recon_l1 = (m.decode(m.encode(video)) - video).abs().mean().item()
    assert recon_l1 < 0.35 * first, (first, recon_l1)


def test_checkpoint_round_trip_gives_identical_encodes(tmp_path):
    m = model()
    path = checkpoint.save(tmp_path / "larp.safetensors", m, CFG, card={"data": "test"})
    ckpt = checkpoint.load(path, expected_config=LARPConfig)
    fresh = LARPTokenizer(ckpt.config_as(LARPConfig))
    ckpt.load_into(fresh)
    video = clip(seed=9)
    assert torch.equal(fresh.eval().encode(video), m.encode(video))


def test_patch_discriminator_shapes_and_hinge_losses():
    from vidgen.tokenizers.gan import PatchDiscriminator, hinge_d_loss, hinge_g_loss

    disc = PatchDiscriminator(3, dim=8, layers=3)
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 8, 8)  # one logit per patch
    with pytest.raises(ValueError, match="too small"):
        disc(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        disc(torch.zeros(2, 1, 3, 64, 64))
    confident = hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    fooled = hinge_d_loss(torch.full((4,), -1.0), torch.full((4,), 1.0))
    assert confident.item() == 0.0 and fooled.item() == 2.0
    assert hinge_g_loss(torch.full((4,), 3.0)).item() == -3.0


def test_patch_discriminator_learns_sharp_from_blurred_frames():
    from vidgen.tokenizers.gan import PatchDiscriminator, hinge_d_loss

    torch.manual_seed(0)
    disc = PatchDiscriminator(3, dim=16, layers=2)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    real = torch.rand(16, 3, 16, 16).round() * 2 - 1  # hard-edged binary frames
    fake = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1)  # their blur
    losses = []
    for _ in range(60):
        loss = hinge_d_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert disc(real).mean() > disc(fake).mean()


def test_foreground_weight_weights_the_reconstruction_of_objects_up():
    """With foreground_weight, an error on a small object costs more than the same error on
    the background; off, both cost the same (the plain means)."""
    cfg = dataclasses.replace(CFG, foreground_threshold=0.5)
    video = torch.zeros(1, cfg.frames, cfg.channels, cfg.size, cfg.size)
    video[:, :, :, :1, :1] = 1.0  # a one-position object in every frame (size 4x4)

    def losses(weight: float, where: tuple[slice, slice]) -> tuple[float, float]:
        m = model(dataclasses.replace(cfg, foreground_weight=weight))
        recon = video.clone()
        recon[:, :, :, where[0], where[1]] += 0.3  # the same error, here
        m.decode_codes = lambda _quantised: recon
        out = m(video, torch.Generator().manual_seed(0))
        return out["l1"].item(), out["mse"].item()

    on_object, on_background = (slice(0, 1), slice(0, 1)), (slice(3, 4), slice(3, 4))
    plain = [losses(0.0, s) for s in (on_object, on_background)]
    assert plain[0] == pytest.approx(plain[1]) and plain[0][0] > 0
    weighted = [losses(4.0, s) for s in (on_object, on_background)]
    assert weighted[0][0] > plain[0][0] > weighted[1][0]
    assert weighted[0][1] > plain[0][1] > weighted[1][1]
    with pytest.raises(ValueError, match="foreground_weight"):
        dataclasses.replace(CFG, foreground_weight=-1.0)
    with pytest.raises(ValueError, match="foreground_threshold"):
        dataclasses.replace(CFG, foreground_threshold=0.0)


CTX = dataclasses.replace(CFG, context_decoder=True)


def test_a_context_decoder_reads_the_previous_clips_tokens():
    m = model(CTX)
    ids = m.encode(clip(batch=6, seed=2)).reshape(2, 3, -1)
    video = m.decode_video(ids)  # (2, 3 t, ...): clip i decoded with clip i - 1's ids
    assert video.shape == (2, 3 * CFG.frames, CFG.channels, CFG.size, CFG.size)
    first, second = video[:, : CFG.frames], video[:, CFG.frames : 2 * CFG.frames]
    torch.testing.assert_close(first, m.decode(ids[:, 0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, m.decode(ids[:, 1], ids[:, 0]), rtol=1e-5, atol=1e-6)
    # A row of NO_CONTEXT is a first clip; other context, other frames.
    none = torch.full_like(ids[:, 0], NO_CONTEXT)
    mixed = torch.stack([ids[0, 0], none[1]])
    torch.testing.assert_close(
        m.decode(ids[:, 1], mixed)[1], m.decode(ids[1:, 1])[0], rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(m.decode(ids[:, 1], ids[:, 2]), second, atol=1e-3)
    with pytest.raises(ValueError, match="all ids in \\[0, 64\\) or all NO_CONTEXT"):
        m.decode(ids[:, 1], torch.cat([ids[:, 0, :1], none[:, 1:]], dim=1))
    with pytest.raises(ValueError, match="all ids in \\[0, 64\\) or all NO_CONTEXT"):
        m.decode(ids[:, 1], torch.cat([none[:, :1], ids[:, 0, 1:]], dim=1))  # not by row 0
    with pytest.raises(ValueError, match="all ids in \\[0, 64\\) or all NO_CONTEXT"):
        m.decode(ids[:, 1], ids[:, 0].clone().fill_(-5))
    for bad in (-1, CFG.codebook_size):  # no wrap-around or bare IndexError
        with pytest.raises(ValueError, match=f"ids must lie in \\[0, {CFG.codebook_size}\\)"):
            m.decode(ids[:, 1].clone().fill_(bad))
    with pytest.raises(ValueError, match="no context decoder"):
        model().decode(ids[:, 1], ids[:, 0])
    # A plain decoder's video is its clips decoded alone.
    plain = model()
    torch.testing.assert_close(
        plain.decode_video(ids)[:, CFG.frames : 2 * CFG.frames], plain.decode(ids[:, 1])
    )


def test_context_training_decodes_consecutive_clips_and_scores_their_seams():
    m = model(dataclasses.replace(CTX, seam_weight=1.0)).train()
    video = clip(batch=6, seed=3).reshape(2, 3 * CFG.frames, *clip(1).shape[2:])
    out = m(video, torch.Generator().manual_seed(0))
    assert out["recon"].shape == (6, *clip(1).shape[1:]) and out["seam"] > 0
    # The seam term: the reconstructed step across each seam against the true one.
    recon = out["recon"].detach().reshape(2, 3, *out["recon"].shape[1:])
    truth = video.reshape(2, 3, CFG.frames, *video.shape[2:])
    step = recon[:, 1:, 0] - recon[:, :-1, -1]
    expected = (step - (truth[:, 1:, 0] - truth[:, :-1, -1])).abs().mean()
    torch.testing.assert_close(out["seam"].detach(), expected)
    assert (
        float(
            LARPTokenizer._seam_loss(
                video.reshape(6, CFG.frames, *video.shape[2:]),
                video.reshape(6, CFG.frames, *video.shape[2:]),
                3,
            )
        )
        == 0
    )
    # Clip i's reconstruction read clip i - 1's codes: the eval decode of the same ids agrees.
    m.eval()
    ids = m.encode(video.reshape(6, CFG.frames, *video.shape[2:])).reshape(2, 3, -1)
    torch.testing.assert_close(m.decode_video(ids), m(video)["recon"].reshape(video.shape))
    out["loss"].backward()
    assert m.context_pos.grad is not None and m.context_null.grad is not None
    with pytest.raises(ValueError, match="seam_weight"):
        dataclasses.replace(CFG, seam_weight=1.0)
    with pytest.raises(ValueError, match="video must be"):
        model()(video)  # consecutive clips are for a context decoder only


def test_a_plain_checkpoint_loads_into_a_context_decoder_when_allowed(tmp_path):
    plain = model()
    path = checkpoint.save(tmp_path / "larp.safetensors", plain, CFG)
    ckpt = checkpoint.load(path, expected_config=LARPConfig)
    target = LARPTokenizer(CTX)
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        ckpt.load_into(target)
    added = LARPTokenizer.ADDED_BY_FINE_TUNES
    assert ckpt.load_into(target, missing_ok=added) == ["context_null", "context_pos"]
    video = clip(seed=5)
    assert torch.equal(target.eval().encode(video), plain.encode(video))
    assert ckpt.load_into(LARPTokenizer(CFG), missing_ok=added) == []  # nothing to add


def test_every_codeword_quantises_to_its_own_id_up_to_the_last():
    """Random encodings reach only some codes (never the last): each codeword fed in must
    come back as exactly its index, so an off-by-one at the top edge cannot pass."""
    m = model()
    codes = m.quantizer.codes()
    with torch.no_grad():
        ids, quantised = m.quantizer(codes * 3.0)  # scale: the cosine VQ ignores norms
    assert torch.equal(ids, torch.arange(CFG.codebook_size))
    assert torch.allclose(quantised, codes)


def test_usage_counts_the_nearest_codes_and_evaluation_never_samples():
    """Dead codes are those ``encode`` never picks: a code that is only ever sampled (tau
    makes far codes likely) must not count as used. And a model in eval mode takes the
    nearest codes whatever generator it is given."""
    cfg = dataclasses.replace(CFG, tau=5.0)  # sampling nearly uniform: far from the argmax
    m = model(cfg)
    m.quantizer.active.fill_(1)
    video = clip(batch=4, cfg=cfg)
    nearest = m.encode(video).flatten()
    m.train()
    m.quantizer.usage.zero_()
    out = m(video, torch.Generator().manual_seed(0))
    expected = torch.bincount(nearest, minlength=cfg.codebook_size).float()
    expected = (1 - cfg.usage_decay) * expected / expected.sum()
    torch.testing.assert_close(m.quantizer.usage, expected)
    used = int((expected > 0).sum())
    assert out["perplexity"] <= used  # the sampled codes would spread over far more
    m.eval()
    with torch.no_grad():
        a = m(video, torch.Generator().manual_seed(1))
        b = m(video, torch.Generator().manual_seed(2))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["recon"], b["recon"])


def test_dead_usage_must_not_exceed_an_evenly_used_codes_share():
    """larp-large (8,192 codes) had dead_usage 2e-4 > 1/8192: every code, evenly used, was
    dead, and each restart moved the whole codebook. Refused when training starts (a saved
    config of that kind still loads, to encode with)."""
    many = dataclasses.replace(CFG, codebook_size=8192)  # loads: only training reads it
    assert "dead_usage=0.0002 must not exceed" in many.restart_problem()
    assert dataclasses.replace(many, restart_every=0).restart_problem() is None
    assert LARP_CONFIGS["large"].restart_problem() is None
    assert LARP_CONFIGS["tiny"].restart_problem() is None
    # At exactly 1/K an evenly used code is not dead (usage < dead_usage): allowed.
    assert dataclasses.replace(CFG, codebook_size=64, dead_usage=1 / 64).restart_problem() is None


@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_ids_are_still_the_nearest_codeword(autocast):
    """In bfloat16 the cosine logits were rounded so coarsely (steps of 0.125 at tau 0.05)
    that about 2% of the ids were not the nearest codeword of their own z."""
    from vidgen.tokenizers.larp import StochasticVQ

    torch.manual_seed(0)
    vq = StochasticVQ(1024, 16, tau=0.05, usage_decay=0.99)
    z = torch.randn(512, 16)
    if not autocast:
        vq, z = vq.to(torch.bfloat16), z.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ids, quantised, nearest = vq.quantize(z)
    cos = F.normalize(z, dim=-1).double() @ vq.codes().double().t()
    assert torch.equal(nearest, cos.argmax(-1)) and torch.equal(ids, nearest)
    assert quantised.dtype == z.dtype  # the straight-through code stays in z's dtype


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_ids_of_any_integer_dtype_decode_as_int64_ones(dtype):
    # (with a codebook of 300 ids: in uint8 its size wrapped to 44 in the range check)
    """uint8 ids indexed the codebook as a boolean mask and int16 ones not at all (torch's
    errors, naming neither ids nor their dtype)."""
    m = model(dataclasses.replace(CTX, codebook_size=300))  # its size wraps in 8 bits
    ids = torch.randint(0, 200, (2, CTX.num_tokens), generator=torch.Generator().manual_seed(0))
    expected = m.decode(ids[1:], ids[:1])
    assert torch.equal(m.decode(ids[1:].to(dtype), ids[:1].to(dtype)), expected)
    with pytest.raises(ValueError, match="ids must be integer"):
        m.decode(ids.float())
    with pytest.raises(ValueError, match="context must be integer ids"):
        m.decode(ids[1:], ids[:1].float())
    # The prior indexed the codebook with them as they were (torch's IndexError).
    wide_ce = prior_cross_entropy(m, ids)
    assert prior_cross_entropy(m, ids.to(dtype)) == wide_ce
    with pytest.raises(ValueError, match="ids must lie in"):
        m.prior_logits(ids + 300)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_of_another_dtype_trains(dtype):
    """Its usage buffer was cast with it, the batch's code shares not: lerp_ refused them."""
    m = model(CFG).to(dtype).train()
    out = m(clip(batch=2).to(dtype), torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and m.quantizer.usage.dtype == dtype


@pytest.mark.parametrize(
    "key", ["foreground_weight", "foreground_threshold", "seam_weight", "gan_weight"]
)
def test_nan_loss_settings_are_refused_by_name(key):
    """NaN passed their `<` checks: the run then stopped as diverged, blaming the lr."""
    with pytest.raises(ValueError, match=f"{key} must be finite, got nan"):
        dataclasses.replace(CTX, **{key: float("nan")})


def test_decode_video_of_narrow_integer_ids_gives_the_first_clip_no_context():
    """NO_CONTEXT (-1) in uint8 ids was 255: the first clip was decoded as if the clip
    before were all code 255 (a real code of a 1024-code book; refused here, 64 codes)."""
    m = model(CTX)
    ids = m.encode(clip(batch=4, seed=2)).reshape(2, 2, -1)
    wide = m.decode_video(ids)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        torch.testing.assert_close(m.decode_video(ids.to(dtype)), wide, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ids must be integer"):
        m.decode_video(ids.float())


def test_training_on_no_frames_is_refused_and_leaves_code_usage_finite():
    """A batch of nothing gave a NaN loss, and 0 / 0 made every code's usage NaN for good:
    dead codes never restarted again, and the exported file did not load."""
    m = model(CFG).train()
    with pytest.raises(ValueError, match=r"video must hold frames, got shape \(0,"):
        m(clip(batch=2)[:0])
    m.quantizer.track(torch.zeros(0, dtype=torch.int64))
    assert torch.isfinite(m.quantizer.usage).all()
    ctx = model(CTX).train()
    with pytest.raises(ValueError, match="video must hold frames"):
        ctx(clip(batch=2)[:, :0])


def test_video_of_another_dtype_is_refused_by_name():
    m = model()
    with pytest.raises(ValueError, match="video must be torch.float32 .*got torch.float64"):
        m.encode(clip().double())
    with pytest.raises(ValueError, match="video must be floating point"):
        m.encode((clip() > 0).to(torch.uint8))
    # RGB frames must be in [-1, 1] (0-255 floats were taken); latents have no such bound.
    rgb = dataclasses.replace(CFG, channels=3)
    with pytest.raises(ValueError, match=r"video must hold values in \[-1, 1\]"):
        model(rgb).encode((clip(cfg=rgb) + 1) * 127.5)
    assert m.encode(clip() * 5).shape == (2, CFG.num_tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts it itself
        assert m.encode(clip().bfloat16()).shape == (2, CFG.num_tokens)


@pytest.mark.parametrize("dim", [4, 9, 72, 100])
def test_a_disc_dim_the_patch_gan_cannot_be_built_with_is_refused(dim):
    """GroupNorm's groups must divide each layer's width: 72 failed when the discriminator
    was built, in torch's words, naming no setting."""
    with pytest.raises(ValueError, match=f"disc_dim must be >= 8 .*got {dim}"):
        dataclasses.replace(CFG, disc_dim=dim)
    for fine in (8, 16, 24, 64):
        dataclasses.replace(CFG, disc_dim=fine)

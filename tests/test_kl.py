"""The KL autoencoder's loss terms."""

import dataclasses

import pytest
import torch

from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder, foreground_mask, weighted_l1


def square_frames() -> torch.Tensor:
    """Two frames: a grey background with a 4x4 red square at a different place in each."""
    frames = torch.full((2, 3, 16, 16), -0.6)
    frames[0, :, 2:6, 3:7] = torch.tensor([0.8, -0.7, -0.7])[:, None, None]
    frames[1, :, 9:13, 8:12] = torch.tensor([0.8, -0.7, -0.7])[:, None, None]
    return frames


def test_foreground_mask_is_the_object_not_the_background():
    frames = square_frames()
    mask = foreground_mask(frames)
    assert mask.shape == (2, 1, 16, 16)
    assert mask[0, 0, 2:6, 3:7].all() and mask[1, 0, 9:13, 8:12].all()
    assert mask.sum() == 2 * 16


def test_weighted_l1_weights_object_errors_up_and_background_errors_down():
    target = square_frames()
    on_object, on_background = target.clone(), target.clone()
    on_object[0, :, 2:6, 3:7] += 0.5
    on_background[0, :, 10:14, 0:4] += 0.5  # as many pixels, as large an error
    plain = [weighted_l1(x, target, 0.0) for x in (on_object, on_background)]
    assert plain[0] == pytest.approx(plain[1]) and plain[0] == (on_object - target).abs().mean()
    weighted = [weighted_l1(x, target, 4.0) for x in (on_object, on_background)]
    assert weighted[0] > plain[0] > weighted[1]
    assert weighted_l1(target, target, 4.0) == 0


def test_foreground_weight_enters_the_training_loss():
    torch.manual_seed(0)
    model = KLAutoencoder(KL_CONFIGS["test"])
    video = torch.nn.functional.interpolate(square_frames(), size=32)[None]  # (1, 2, 3, 32, 32)
    plain = model(video, torch.Generator().manual_seed(0))
    model.config = dataclasses.replace(model.config, foreground_weight=4.0)
    weighted = model(video, torch.Generator().manual_seed(0))
    assert torch.equal(plain["ssim"], weighted["ssim"])  # the same reconstruction
    assert weighted["loss"] != plain["loss"]


def test_latent_noise_is_a_per_frame_level_in_scaled_units_in_training_only():
    torch.manual_seed(0)
    model = KLAutoencoder(dataclasses.replace(KL_CONFIGS["test"], scale=2.0, latent_noise=0.5))
    video = torch.nn.functional.interpolate(square_frames(), size=32)[None]  # (1, 2, ...)
    seen = []
    model.decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model(video, torch.Generator().manual_seed(0))  # a new module trains
    with torch.no_grad():
        mean, logvar = model.posterior(video)
    g = torch.Generator().manual_seed(0)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
    level = torch.rand(1, 2, 1, 1, 1, generator=g) * 0.5  # U(0, 0.5) per frame
    expected = z + torch.randn(z.shape, generator=g) * level / 2.0  # scaled units / scale
    torch.testing.assert_close(seen[0], expected.flatten(0, 1))
    assert level[0, 0].item() != pytest.approx(level[0, 1].item(), rel=0.05)
    model.eval()  # the noise is a training augmentation only
    model(video, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[1], z.flatten(0, 1))


def test_latent_noise_must_not_be_negative():
    with pytest.raises(ValueError, match="latent_noise"):
        dataclasses.replace(KL_CONFIGS["test"], latent_noise=-0.1)


def test_frames_or_latents_of_another_size_are_refused():
    """Frames not of image_size came back shrunk to a multiple of 8 without a word."""
    cfg = KL_CONFIGS["test"]
    model = KLAutoencoder(cfg).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="video must be float"):
            model.encode(torch.zeros(1, 1, 3, cfg.image_size - 2, cfg.image_size - 2))
        with pytest.raises(ValueError, match="video must be float"):
            model.encode(torch.zeros(1, 1, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8))
        with pytest.raises(ValueError, match="latents must be"):
            model.decode(torch.zeros(1, 1, cfg.latent_channels, 3, 3))


def test_an_empty_batch_and_other_dtypes():
    """A batch of 0 failed in einops (ZeroDivisionError); float64 or float16 inside a conv,
    naming no argument."""
    cfg = KL_CONFIGS["test"]
    model = KLAutoencoder(cfg).eval()
    size = cfg.image_size
    with torch.no_grad():
        latents = model.encode(torch.zeros(0, 3, 3, size, size))
        assert latents.shape == (0, 3, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        assert model.decode(latents).shape == (0, 3, 3, size, size)
        with pytest.raises(ValueError, match="video must be torch.float32"):
            model.encode(torch.zeros(1, 1, 3, size, size, dtype=torch.float64))
        with pytest.raises(ValueError, match="latents must be torch.float32"):
            model.decode(latents.half())
    # Training on no frames: every loss NaN, without a word.
    for empty in (torch.zeros(0, 3, 3, size, size), torch.zeros(2, 0, 3, size, size)):
        with pytest.raises(ValueError, match="video must hold frames"):
            model.train()(empty)


def test_frames_of_another_range_are_refused_and_a_resampling_overshoot_is_not():
    """Frames of 0-255 as floats were encoded without a word (latents of nothing seen in
    training); NaN frames too."""
    cfg = KL_CONFIGS["test"]
    model = KLAutoencoder(cfg).eval()
    size = cfg.image_size
    frames = torch.rand(1, 2, 3, size, size) * 255
    with torch.no_grad():
        with pytest.raises(ValueError, match="video must hold values in \\[-1, 1\\].* up to 25"):
            model.encode(frames)
        with pytest.raises(ValueError, match="video must hold values in .* up to nan"):
            model.encode(torch.full((1, 1, 3, size, size), float("nan")))
        fine = (frames / 127.5 - 1) * 1.1  # a bicubic resize overshoots [-1, 1] a little
        assert model.encode(fine).shape == (
            1,
            2,
            cfg.latent_channels,
            cfg.latent_size,
            cfg.latent_size,
        )
        # Latents have no such bound.
        model.decode(torch.full((1, 1, cfg.latent_channels, cfg.latent_size, cfg.latent_size), 5.0))


def test_channels_are_checked_as_ints():
    for bad, message in (
        ((0, 8, 16, 16), "channels\\[0\\] must be >= 8"),
        ((8.0, 8, 16, 16), "must be an int"),
    ):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(KL_CONFIGS["test"], channels=bad)


def test_an_evaluation_forward_is_deterministic_and_leaves_the_global_rng_alone():
    """In eval mode without a generator it sampled the posterior from the global RNG."""
    cfg = KL_CONFIGS["test"]
    model = KLAutoencoder(cfg).eval()
    video = torch.rand(1, 2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = model(video), model(video)
    assert torch.equal(torch.get_rng_state(), state)
    assert float(a["loss"]) == float(b["loss"])


def test_ssim_after_a_call_under_inference_mode_still_trains():
    """The cached window, made as an inference tensor, failed every later backward."""
    from vidgen.tokenizers.losses import ssim

    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        ssim(x, x, window=5, sigma=1.1)  # a window size no other test makes first
    y = x.clone().requires_grad_()
    ssim(y, x * 0.5, window=5, sigma=1.1).backward()
    assert y.grad is not None

"""Per-frame KL autoencoder: the continuous latent space of the diffusion family.

Each frame is encoded on its own by a small conv encoder to a diagonal Gaussian over latents
with ``latent_channels`` channels at 1/8 of the resolution (64x64 RGB -> 4x8x8); the decoder
maps latents back to frames. Latents handed to the generator are the posterior means times
``scale`` (set after training so they have unit variance), the convention of latent
diffusion.

Loss (``forward``): L1 + ``perceptual_weight`` x (1 - SSIM) + ``grad_weight`` x L1 of image
gradients + ``kl_weight`` x KL. SSIM and gradient terms need no downloaded network: SSIM
rewards local structure and contrast that L1 alone blurs, and the gradient term keeps object
edges sharp, which is what the scene metrics (object detection by colour) depend on.
Small objects are a few percent of a frame, so a frame-mean L1 barely sees their colours:
``foreground_weight`` w weights the L1 of foreground pixels (those farther than 0.1 in summed
channel distance from the frame's per-channel median, its background) by 1 + w, normalised
so the loss stays a weighted mean.

Axis letters: ``b`` batch, ``t`` frames, ``c`` channels, ``h``/``w`` height/width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidgen.tokenizers.losses import gradient_l1, ssim
from vidgen.validate import check_int, check_ints, check_number, shown, values_checkable

MAX_BLOCKS = 64  # residual blocks per level (8 levels of them in all)

# Frames in [-1, 1] may overshoot a little after resampling (bicubic, antialiased resizes):
# only values past this are refused, as frames of another range (0-255 floats).
VIDEO_BOUND = 2.0


def check_float_input(name: str, x: torch.Tensor, dtype: torch.dtype, video: bool = False) -> None:
    """``x`` must be floating point in the model's ``dtype`` (autocast casts it itself):
    integer frames (uint8: ``to_model_range`` first) or float64 failed inside a layer,
    naming no argument. A ``video`` must also lie in [-1, 1] (within ``VIDEO_BOUND``; where
    ``values_checkable``): frames of 0-255 as floats were encoded without a word, into
    latents of nothing seen in training."""
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be floating point in [-1, 1] (uint8 frames: to_model_range), got "
            f"{x.dtype}"
        )
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name} must be {dtype} (the model's dtype), got {x.dtype}")
    if video and x.numel() and values_checkable(x):
        peak = float(x.detach().abs().amax())
        if not peak <= VIDEO_BOUND:  # NaN too
            raise ValueError(
                f"{name} must hold values in [-1, 1] (uint8 frames: to_model_range), got "
                f"values up to {peak:g} in magnitude"
            )


@dataclass
class KLConfig:
    """``channels`` per resolution level (len 4: full, 1/2, 1/4, 1/8); ``blocks`` residual
    blocks per level."""

    image_size: int = 64
    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, int, int, int] = (32, 64, 128, 128)
    blocks: int = 1
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.2
    grad_weight: float = 0.5
    foreground_weight: float = 0.0  # extra L1 weight on pixels unlike the frame's background
    # Decoder robustness: Gaussian noise of std U(0, latent_noise) per frame, in scaled-latent
    # units, added to the latents the decoder reconstructs from (0: off).
    latent_noise: float = 0.0
    scale: float = 1.0  # latent scale (1 / std of posterior means), set after training

    # Fields measured on a trained model, not chosen: fine-tuning takes them from its init.
    MEASURED: ClassVar[tuple[str, ...]] = ("scale",)

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)  # Hydra hands lists
        if len(self.channels) != 4:
            raise ValueError(f"channels must have 4 levels (8x downsampling), got {self.channels}")
        for i, c in enumerate(self.channels):  # 0, -8 and 8.0 passed `c % 8`
            check_int(f"channels[{i}]", c, minimum=8)
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")
        if any(c % 8 for c in self.channels):
            raise ValueError(f"channels must be multiples of 8 (GroupNorm), got {self.channels}")
        check_ints(self, 1, "image_size", "in_channels", "latent_channels", "blocks")
        if self.blocks > MAX_BLOCKS:  # a file saying 2**40 built blocks for ever at load
            raise ValueError(f"blocks must be <= {MAX_BLOCKS} per level, got {shown(self.blocks)}")
        for name in ("kl_weight", "perceptual_weight", "grad_weight", "foreground_weight"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("latent_noise", self.latent_noise, minimum=0)
        check_number("scale", self.scale, above=0)

    @property
    def latent_size(self) -> int:
        return self.image_size // 8


KL_CONFIGS: dict[str, KLConfig] = {
    "test": KLConfig(image_size=32, channels=(8, 8, 16, 16), blocks=1),
    # Full resolution is where a CPU step spends its time; 16 channels there keep a step of 16
    # frames near 1 s on one core.
    "tiny": KLConfig(image_size=64, channels=(16, 48, 96, 128), blocks=1),
}


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, cin),
            nn.SiLU(),
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(8, cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(cin if i == 0 else cout, cout) for i in range(blocks)))


class Encoder(nn.Module):
    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, c[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                _stage(c[i], c[i], cfg.blocks),
                nn.Conv2d(c[i], c[i + 1], 4, stride=2, padding=1),
            ]
        layers += [_stage(c[3], c[3], cfg.blocks), nn.GroupNorm(8, c[3]), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(c[3], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.body(self.conv_in(x)))  # (b, 2*z, h/8, w/8)


class Decoder(nn.Module):
    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, c[3], 3, padding=1)
        layers: list[nn.Module] = [_stage(c[3], c[3], cfg.blocks)]
        for i in (3, 2, 1):
            layers += [
                nn.Upsample(scale_factor=2.0, mode="nearest"),
                nn.Conv2d(c[i], c[i - 1], 3, padding=1),
                _stage(c[i - 1], c[i - 1], cfg.blocks),
            ]
        layers += [nn.GroupNorm(8, c[0]), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(c[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.body(self.conv_in(z)))


class KLAutoencoder(nn.Module):
    """Frames (b, t, 3, H, W) in [-1, 1] <-> latents (b, t, z, H/8, W/8)."""

    # Bump when the encoder's code changes what it computes from the same weights.
    ENCODER_VERSION: ClassVar[int] = 1
    # The tensors the fingerprint covers (a freeze of part of them is refused in training).
    ENCODER_TENSORS: ClassVar[tuple[str, ...]] = ("encoder.",)
    # The config fields that decide what the encoder computes (the rest are losses).
    ENCODER_SETTINGS: ClassVar[tuple[str, ...]] = (
        "image_size",
        "in_channels",
        "latent_channels",
        "channels",
        "blocks",
        "scale",
    )

    def __init__(self, config: KLConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (b, t, z, h, w), of unscaled latents."""
        size = self.config.image_size
        expected = ("b", "t", self.config.in_channels, size, size)
        if (
            video.ndim != 5
            or not video.is_floating_point()
            or tuple(video.shape[2:]) != expected[2:]
        ):
            # other sizes came back shrunk to a multiple of 8 without a word
            raise ValueError(
                f"video must be float {expected} in [-1, 1], got {video.dtype} {tuple(video.shape)}"
            )
        check_float_input("video", video, self.encoder.conv_in.weight.dtype, video=True)
        b, t = video.shape[:2]
        # Contiguous: frames made from HWC arrays have channels-last strides, and with the
        # input conv frozen (decoder fine-tuning) torch 2.13's CPU conv backward segfaults on
        # them.
        moments = self.encoder(rearrange(video, "b t c h w -> (b t) c h w").contiguous())
        # t as well as b: with b = 0 einops could not tell t (a ZeroDivisionError)
        mean, logvar = rearrange(moments, "(b t) c h w -> b t c h w", b=b, t=t).chunk(2, dim=2)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: the posterior mean, or a sample when a generator is given."""
        mean, logvar = self.posterior(video)
        if generator is not None:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            mean = mean + (0.5 * logvar).exp() * noise
        return mean * self.config.scale

    def encoder_fingerprint(self) -> str:
        """Identifies the latents this autoencoder makes (its encoder's weights, shapes and
        ``scale``, and ``ENCODER_VERSION``): a model trained on its latents stays valid when
        only the decoder is fine-tuned. Deliberately a little stricter than the latents: the
        log-variance half of the encoder's output and ``image_size`` are covered too."""
        from vidgen.checkpoint import module_fingerprint

        fields, version = self.ENCODER_SETTINGS, self.ENCODER_VERSION
        return module_fingerprint(
            self, self.ENCODER_TENSORS, self.config, fields, kind="kl", version=version
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (b, t, z, h, w) -> frames (b, t, 3, H, W), unclamped."""
        shape = (self.config.latent_channels, self.config.latent_size, self.config.latent_size)
        if latents.ndim != 5 or tuple(latents.shape[2:]) != shape:
            raise ValueError(f"latents must be (b, t, *{shape}), got {tuple(latents.shape)}")
        check_float_input("latents", latents, self.decoder.conv_in.weight.dtype)
        b, t = latents.shape[:2]
        z = rearrange(latents / self.config.scale, "b t c h w -> (b t) c h w")
        return rearrange(self.decoder(z), "(b t) c h w -> b t c h w", b=b, t=t)

    def forward(
        self, video: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses and metrics of reconstructing ``video`` (b, t, 3, H, W) in [-1, 1]."""
        cfg = self.config
        if video.ndim == 5 and (video.shape[0] == 0 or video.shape[1] == 0):
            # Every loss the mean of nothing: NaN, trained on without a word.
            raise ValueError(f"video must hold frames, got shape {tuple(video.shape)}")
        mean, logvar = self.posterior(video)
        z = mean  # evaluation without a generator: deterministic, the global RNG untouched
        if self.training or generator is not None:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            z = mean + (0.5 * logvar).exp() * noise
        if cfg.latent_noise > 0 and self.training:
            z = z + self._latent_noise(z, generator)
        recon = self.decoder(rearrange(z, "b t c h w -> (b t) c h w"))  # (b*t, 3, H, W)
        target = rearrange(video, "b t c h w -> (b t) c h w")
        l1 = weighted_l1(recon, target, cfg.foreground_weight)
        structural = 1.0 - ssim(recon, target)
        grad = gradient_l1(recon, target)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(2, 3, 4)).mean()
        loss = l1 + cfg.perceptual_weight * structural + cfg.grad_weight * grad + cfg.kl_weight * kl
        with torch.no_grad():
            mse = F.mse_loss(recon.clamp(-1, 1), target)
            psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
        return {
            "loss": loss,
            "l1": l1,
            "ssim": 1.0 - structural,
            "grad": grad,
            "kl": kl,
            "psnr": psnr,
        }

    def _latent_noise(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Noise for unscaled latents ``z`` (b, t, c, h, w): std U(0, ``latent_noise``) per
        frame in scaled units, so the decoder learns to map a generator's slightly-off
        latents to clean frames."""
        cfg = self.config
        opts = {"generator": generator, "device": z.device, "dtype": z.dtype}
        level = torch.rand(*z.shape[:2], 1, 1, 1, **opts) * cfg.latent_noise
        return torch.randn(z.shape, **opts) * level / cfg.scale


def foreground_mask(frames: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(n, 1, H, W) float mask of the pixels of ``frames`` (n, C, H, W) whose summed channel
    distance from the frame's per-channel median (its background) exceeds ``threshold``."""
    background = frames.flatten(2).median(dim=2).values[..., None, None]
    return ((frames - background).abs().sum(1, keepdim=True) > threshold).to(frames.dtype)


def weighted_l1(
    recon: torch.Tensor, target: torch.Tensor, foreground_weight: float
) -> torch.Tensor:
    """Mean L1 with foreground pixels (``foreground_mask`` of the target) weighted by
    1 + ``foreground_weight`` (0: the plain mean)."""
    if foreground_weight == 0:
        return (recon - target).abs().mean()
    return ((recon - target).abs() * foreground_weights(target, foreground_weight)).mean()


def foreground_weights(
    target: torch.Tensor, foreground_weight: float, threshold: float = 0.1
) -> torch.Tensor:
    """(n, 1, H, W) per-position weights of ``target`` (n, C, H, W), normalised to mean 1:
    its foreground (``foreground_mask`` at ``threshold``) 1 + ``foreground_weight`` times
    the rest, so a weighted mean of errors stays on the scale of the plain mean."""
    weight = 1.0 + foreground_weight * foreground_mask(target, threshold)
    return weight / weight.mean()

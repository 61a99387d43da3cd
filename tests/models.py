"""Test-size generators with random weights, saved as real checkpoints (so workers and
actors load them by path, like shipped ones)."""

import dataclasses
from pathlib import Path

import numpy as np

from vidgen import checkpoint
from vidgen.generators import GenerationRequest, generate_video, load_generator
from vidgen.models.ca2vdm import CA2VDM_CONFIGS, CausalVideoDiT
from vidgen.models.nbp import NBP_CONFIGS, NextBlockTransformer
from vidgen.nn import randomize_
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder
from vidgen.tokenizers.larp import LARP_CONFIGS, LARPTokenizer


def save_test_generators(folder: Path) -> dict[str, str]:
    """{"diffusion": path, "tokens": path} of test-size generator checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    kl_cfg = KL_CONFIGS["test"]
    autoencoder = randomize_(KLAutoencoder(kl_cfg), seed=2, std=0.1)
    kl = checkpoint.save(folder / "kl-test.safetensors", autoencoder, kl_cfg)
    dit_cfg = CA2VDM_CONFIGS["test"]
    dit = checkpoint.save(
        folder / "ca2vdm-test.safetensors",
        randomize_(CausalVideoDiT(dit_cfg), seed=1),
        dit_cfg,
        card={"tokenizer": str(kl), "tokenizer_fingerprint": autoencoder.encoder_fingerprint()},
    )
    # A context decoder: serving then carries each clip's previous tokens to its decode.
    larp_cfg = dataclasses.replace(LARP_CONFIGS["test"], autoencoder=str(kl), context_decoder=True)
    tokenizer = randomize_(LARPTokenizer(larp_cfg), seed=3, std=0.1)
    larp = checkpoint.save(folder / "larp-test.safetensors", tokenizer, larp_cfg)
    larp_fingerprint = tokenizer.encoder_fingerprint(autoencoder.encoder_fingerprint())
    nbp_cfg = NBP_CONFIGS["test"]
    nbp = checkpoint.save(
        folder / "nbp-test.safetensors",
        randomize_(NextBlockTransformer(nbp_cfg), seed=1),
        nbp_cfg,
        card={"tokenizer": str(larp), "tokenizer_fingerprint": larp_fingerprint},
    )
    return {"diffusion": str(dit), "tokens": str(nbp)}


_REFERENCES: dict[tuple, np.ndarray] = {}


def reference(model: str, request: GenerationRequest) -> np.ndarray:
    """The frames ``request`` makes in this process (``generate_video`` on a fresh
    generator), remembered: many tests compare their serving path against the same video.
    Keyed by the request's fingerprint and the size and time of every checkpoint in the
    model's folder (a test that rewrites one, the tokenizer a card names included, gets a
    new reference); read-only, so a test cannot change what the next one compares with."""
    folder = Path(model).parent
    files = tuple(
        (p.name, p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(folder.glob("*.safetensors"))
    )
    key = (str(Path(model).resolve()), files, request.fingerprint(canonical=False))
    if key not in _REFERENCES:
        gen = load_generator(model, max_streams=1)
        frames = np.concatenate([c.frames for c in generate_video(gen, request)])
        frames.setflags(write=False)
        _REFERENCES[key] = frames
    return _REFERENCES[key]

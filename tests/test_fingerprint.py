"""Encoder fingerprints: a generator is refused with a tokenizer whose encode path is not the
one it was trained on, and accepted when only the tokenizer's decoder (or prior) changed."""

import pytest
import torch

from tests.models import save_test_generators
from vidgen import checkpoint
from vidgen.checkpoint import CheckpointError
from vidgen.generators import load_generator
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder
from vidgen.tokenizers.larp import LARP_CONFIGS, LARPTokenizer, LARPVideoTokenizer


def _bump(module: torch.nn.Module, prefix: str, index: int = 0) -> None:
    """Add 0.01 to the ``index``-th tensor whose name starts with ``prefix``."""
    name = [k for k in module.state_dict() if k.startswith(prefix)][index]
    with torch.no_grad():
        module.state_dict()[name].add_(0.01)


@pytest.mark.parametrize(
    "prefix, index, same",
    [
        ("decoder.", 0, True),
        ("decoder.", -1, True),
        ("encoder.", 0, False),
        ("encoder.", -1, False),
    ],
)
def test_kl_fingerprint_follows_the_encoder_only(prefix, index, same):
    model = KLAutoencoder(KL_CONFIGS["test"])
    before = model.encoder_fingerprint()
    assert before == model.encoder_fingerprint() and len(before) == 16
    _bump(model, prefix, index)
    assert (model.encoder_fingerprint() == before) is same


def test_kl_fingerprint_follows_the_latent_scale():
    model = KLAutoencoder(KL_CONFIGS["test"])
    before = model.encoder_fingerprint()
    model.config.scale = 0.5
    assert model.encoder_fingerprint() != before


@pytest.mark.parametrize(
    "prefix, same",
    [
        ("decoder.", True),
        ("prior.", True),
        ("patch_out.", True),
        ("latent_pos", True),
        ("quantizer.usage", True),
        ("encoder.", False),
        ("quantizer.codebook", False),
        ("to_code.", False),
        ("queries", False),
        ("patch_in.", False),
    ],
)
def test_larp_fingerprint_follows_what_decides_the_ids(prefix, same):
    model = LARPTokenizer(LARP_CONFIGS["test"])
    before = model.encoder_fingerprint()
    _bump(model, prefix)
    assert (model.encoder_fingerprint() == before) is same
    # The ids also depend on the autoencoder that makes the LARP's input.
    assert model.encoder_fingerprint("a") != model.encoder_fingerprint("b")


def test_a_generator_is_refused_with_another_tokenizer_encoder(tmp_path):
    paths = save_test_generators(tmp_path)
    kl_path = tmp_path / "kl-test.safetensors"
    for path in paths.values():
        load_generator(path)  # as trained: accepted
    ckpt = checkpoint.load(kl_path)
    autoencoder = KLAutoencoder(ckpt.config_as(type(KL_CONFIGS["test"])))
    ckpt.load_into(autoencoder)

    # A fine-tuned decoder keeps the latents: both families still load.
    _bump(autoencoder, "decoder.")
    checkpoint.save(kl_path, autoencoder, autoencoder.config)
    for path in paths.values():
        load_generator(path)

    # Another encoder: the latents (and the LARP's ids of them) mean other things.
    _bump(autoencoder, "encoder.")
    checkpoint.save(kl_path, autoencoder, autoencoder.config)
    for path in paths.values():
        with pytest.raises(CheckpointError, match="encoder fingerprint"):
            load_generator(path)


def test_a_token_generator_is_refused_with_another_codebook(tmp_path):
    paths = save_test_generators(tmp_path)
    larp_path = tmp_path / "larp-test.safetensors"
    tokenizer = LARPVideoTokenizer.from_pretrained(str(larp_path))
    _bump(tokenizer.larp, "quantizer.codebook")
    checkpoint.save(larp_path, tokenizer.larp, tokenizer.larp.config)
    with pytest.raises(CheckpointError, match=r"nbp-test.*fingerprint"):
        load_generator(paths["tokens"])
    load_generator(paths["diffusion"])  # the diffusion family does not use the LARP


def test_cards_without_a_fingerprint_still_load(tmp_path):
    """Checkpoints from before fingerprints: no check (nothing to compare with)."""
    paths = save_test_generators(tmp_path)
    for path in paths.values():
        ckpt = checkpoint.load(path)
        card = {k: v for k, v in ckpt.card.items() if k != "tokenizer_fingerprint"}
        checkpoint.save(path, ckpt.tensors, _config(ckpt), card=card)
        load_generator(path)


def _config(ckpt: checkpoint.Checkpoint):
    from vidgen.models.ca2vdm import Ca2VDMConfig
    from vidgen.models.nbp import NBPConfig

    cls = Ca2VDMConfig if ckpt.config_type.endswith("Ca2VDMConfig") else NBPConfig
    return ckpt.config_as(cls)

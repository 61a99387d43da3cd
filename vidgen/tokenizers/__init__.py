"""Video tokenizers: the per-frame KL autoencoder (continuous) and LARP (discrete)."""

from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder, KLConfig

__all__ = ["KL_CONFIGS", "KLAutoencoder", "KLConfig"]

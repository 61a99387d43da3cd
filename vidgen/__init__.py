"""vidgen: long videos and world-model rollouts from clip-wise autoregressive models."""

__version__ = "0.1.0"

from vidgen import envs as envs  # registers the Gymnasium environments

"""Generators: the causal video DiT (Ca2-VDM) and the next-block transformer (NBP)."""

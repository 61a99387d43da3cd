"""Shared test setup: test-size models are tiny, so one torch thread is fastest and keeps
timings steady when other processes share the CPU."""

import torch

torch.set_num_threads(1)

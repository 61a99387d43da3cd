"""Next-block prediction against next-token prediction: same architecture, same tokens.

Usage: python benchmarks/nbp.py [--config tiny] [--clips 6] [--block 16]

The `tiny` NBP (random weights: speed does not depend on them) makes the same number of clips
of LARP tokens (128 per 8-frame clip) twice in one process: with blocks of 16 (8 block steps
per clip) and with blocks of 1 (plain next-token prediction, 128 steps per clip), the KV cache
on in both, through the real TokenClipGenerator (sampling included, no guidance). Prints one
JSON object last: `speedup_vs_ntp`, `steps_ratio`, frames/s of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from vidgen.generators import GenerationRequest
from vidgen.generators.tokens import TokenClipGenerator
from vidgen.machine import describe_machine
from vidgen.models.nbp import NBP_CONFIGS, NextBlockTransformer
from vidgen.nn import randomize_
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder
from vidgen.tokenizers.larp import LARP_CONFIGS, LARPTokenizer, LARPVideoTokenizer


def frames_per_second(block: int, config: str, clips: int) -> tuple[float, int]:
    cfg = dataclasses.replace(NBP_CONFIGS[config], block=block)
    torch.manual_seed(0)
    model = randomize_(NextBlockTransformer(cfg), seed=0, std=0.02)
    larp = LARPTokenizer(LARP_CONFIGS["tiny"])  # never run here: only steps are timed
    gen = TokenClipGenerator(model, LARPVideoTokenizer(larp, KLAutoencoder(KL_CONFIGS["tiny"])), 1)
    request = GenerationRequest(model="bench", frames=clips * gen.clip_len, label=2, guidance=1.0)
    stream = gen.open(request)
    gen.step([stream])  # warm-up clip (allocations, first-call overheads)
    start = time.perf_counter()
    while not stream.done:
        gen.step([stream])
    seconds = time.perf_counter() - start
    made = (clips - 1) * gen.clip_len
    return made / seconds, cfg.blocks_per_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nbp_fps, nbp_steps = frames_per_second(args.block, args.config, args.clips)
    ntp_fps, ntp_steps = frames_per_second(1, args.config, args.clips)
    print(
        json.dumps(
            {
                "config": args.config,
                "block": args.block,
                "clips_timed": args.clips - 1,
                "nbp_frames_per_s": round(nbp_fps, 2),
                "ntp_frames_per_s": round(ntp_fps, 2),
                "steps_per_clip_nbp": nbp_steps,
                "steps_per_clip_ntp": ntp_steps,
                "steps_ratio": ntp_steps / nbp_steps,
                "speedup_vs_ntp": round(nbp_fps / ntp_fps, 2),
                "threads": torch.get_num_threads(),
                "machine": describe_machine(),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Next-block prediction against next-token prediction: same architecture, same tokens.

Usage: python benchmarks/nbp.py [--config tiny] [--clips 12] [--block 16 (the config's)]

The `tiny` NBP (random weights: speed does not depend on them) makes clips of LARP tokens (128
per 8-frame clip) with blocks of 16 (8 block steps per clip) and with blocks of 1 (plain
next-token prediction, 128 steps per clip), the KV cache on in both, through the real
TokenClipGenerator (sampling included, no guidance), in one process. After a warm-up clip
each, the two streams make one clip in turn, ``--clips`` times, so that a load from other
processes falls on both alike; the medians of the per-clip times are compared (a single run
of each, one after the other, spread from 6.8 to 10.3 over four runs). Prints one JSON object
last: `speedup_vs_ntp`, `steps_ratio`, frames/s of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from _args import threads

from vidgen.generators import GenerationRequest, Stream
from vidgen.generators.tokens import TokenClipGenerator
from vidgen.machine import describe_machine
from vidgen.models.nbp import NBP_CONFIGS, NextBlockTransformer
from vidgen.nn import randomize_
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder
from vidgen.tokenizers.larp import LARP_CONFIGS, LARPTokenizer, LARPVideoTokenizer


def open_stream(block: int, config: str, clips: int) -> tuple[TokenClipGenerator, Stream]:
    """A generator of blocks of ``block`` tokens and a stream of ``clips`` clips on it, its
    first clip made (the warm-up: allocations, first-call overheads)."""
    cfg = dataclasses.replace(NBP_CONFIGS[config], block=block)
    torch.manual_seed(0)
    model = randomize_(NextBlockTransformer(cfg), seed=0, std=0.02)
    # Never run here (only steps are timed): the tiny LARP over kl-tiny's latents, shaped to
    # make the config's clips (tokens, codes, frames), so that every config runs.
    shape = {"num_tokens": cfg.tokens_per_clip, "codebook_size": cfg.vocab}
    larp = LARPTokenizer(
        dataclasses.replace(LARP_CONFIGS["tiny"], **shape, frames=cfg.frames_per_clip)
    )
    gen = TokenClipGenerator(model, LARPVideoTokenizer(larp, KLAutoencoder(KL_CONFIGS["tiny"])), 1)
    request = GenerationRequest(model="bench", frames=clips * gen.clip_len, label=2, guidance=1.0)
    stream = gen.open(request)
    gen.step([stream])
    return gen, stream


def clip_seconds(variants: list[tuple[TokenClipGenerator, Stream]], rounds: int) -> list[float]:
    """Median seconds per clip of each (generator, stream), stepped in turn ``rounds`` times."""
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(rounds):
        for (gen, stream), out in zip(variants, times, strict=True):
            start = time.perf_counter()
            gen.step([stream])
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(NBP_CONFIGS))
    parser.add_argument("--clips", type=int, default=12, help="clips timed of each")
    parser.add_argument(
        "--block", type=int, default=None, help="tokens per block (default: the config's, 16)"
    )
    parser.add_argument("--threads", type=threads, default=1, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    tokens = NBP_CONFIGS[args.config].tokens_per_clip
    if args.block is None:  # 16 failed for --config test, whose clips are 8 tokens
        args.block = NBP_CONFIGS[args.config].block
    if args.block < 1 or tokens % args.block:
        parser.error(f"--block must divide the {tokens} tokens of a {args.config} clip")
    if args.clips < 1:
        parser.error("--clips must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    nbp = open_stream(args.block, args.config, args.clips + 1)
    ntp = open_stream(1, args.config, args.clips + 1)
    nbp_seconds, ntp_seconds = clip_seconds([nbp, ntp], args.clips)
    clip_len = nbp[0].clip_len
    nbp_fps, ntp_fps = clip_len / nbp_seconds, clip_len / ntp_seconds
    nbp_steps = nbp[0].model.config.blocks_per_clip
    ntp_steps = ntp[0].model.config.blocks_per_clip
    print(
        json.dumps(
            {
                "config": args.config,
                "block": args.block,
                "clips_timed": args.clips,
                "nbp_frames_per_s": round(nbp_fps, 2),
                "ntp_frames_per_s": round(ntp_fps, 2),
                "steps_per_clip_nbp": nbp_steps,
                "steps_per_clip_ntp": ntp_steps,
                "steps_ratio": ntp_steps / nbp_steps,
                "speedup_vs_ntp": round(ntp_seconds / nbp_seconds, 2),
                "threads": torch.get_num_threads(),
                "machine": describe_machine(),
            }
        )
    )


if __name__ == "__main__":
    main()

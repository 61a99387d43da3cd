"""Cache sharing: the cached DiT step against recomputing the whole context at every step.

Usage: python benchmarks/cache.py [--configs tiny,base] [--repeats N] [--ar-steps 52]
                                 [--clip-steps 12]

For each config (random weights: speed does not depend on them), with a full window of
context (24 frames) and one clip of 8: the baseline recomputes context + clip at every
denoising step (the banded whole-history forward, sliced to the clip) in the same process;
the cached path reads the K/V written once: the generator reads and rotates the cache once per
clip (``prepare_context``) and every denoising step shares that, so a cached step is timed
with the shared context (and, for reference, also with the cache read again each step). The
script first asserts that both paths give the same clip, then times one denoising step of
each. It also times autoregressive steps (denoise +
write) of one long stream: run to step 52 (``--ar-steps``), with its state at step 4 restored
beside it from a snapshot, the two are stepped in turn ``--repeats`` times (steps 5-14 against
53-62 by default, both after the window is full) and the medians compared.

For the tiny config also a whole clip of ``--clip-steps`` denoising steps (12, the render
default): the cached path then also reads the cache once and runs the write pass (one more
forward of the clip, which recomputing never needs): ``speedup_per_clip``.

Prints one JSON object last: per config `speedup_at_full_context`, `flop_ratio` (tokens the
per-token layers process: (context + clip) / clip), step times, `cached_step_flatness`;
`speedup_per_clip` (tiny).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _args import threads

from vidgen.generators import DiffusionClipGenerator, GenerationRequest
from vidgen.machine import describe_machine
from vidgen.models.ca2vdm import CA2VDM_CONFIGS, CausalVideoDiT, Cond, history_mask
from vidgen.nn import KVCache, randomize_
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder


def interleaved_ms(fns, repeats: int) -> list[float]:
    """Median milliseconds of each function, timed in turn within every round, so that a
    load from other processes falls on all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def compare(name: str, repeats: int, clip_steps: int = 0) -> dict[str, float]:
    cfg = CA2VDM_CONFIGS[name]
    model = randomize_(CausalVideoDiT(cfg), seed=0, std=0.02).eval()
    g = torch.Generator().manual_seed(0)
    shape = (1, cfg.window + cfg.clip_len, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    frames = torch.randn(shape, generator=g)
    context, noisy = frames[:, : cfg.window], frames[:, cfg.window :]
    label = torch.tensor([2])
    cache = KVCache(model.cache_spec())
    s = cache.add_stream()
    for k in range(cfg.window_clips):
        model.write(context[:, k * cfg.clip_len : (k + 1) * cfg.clip_len], cache, [s])
    t = torch.full((1, cfg.clip_len), 0.5)
    cond = Cond(t=t, labels=label)
    total = cfg.window + cfg.clip_len
    drop = torch.zeros(1, total, dtype=torch.bool)
    drop[:, : cfg.window] = True
    full_cond = Cond(
        t=torch.cat([torch.full((1, cfg.window), cfg.prefix_t), t], 1),
        labels=label,
        drop_label=drop,
    )
    mask = history_mask(total, cfg.clip_len, cfg.window_clips)

    shared = model.prepare_context(cache, [s])  # once per clip, as the generator does

    def cached() -> torch.Tensor:  # one denoising step reading the shared context
        return model(noisy, cond, shared)

    def cached_with_read() -> torch.Tensor:  # ... plus reading/rotating the cache again
        return model(noisy, cond, cache, [s])

    def recompute() -> torch.Tensor:
        return model.forward_history(frames, full_cond, mask)[:, cfg.window :]

    diff = (cached() - recompute()).abs().max().item()
    # Checked whatever python's -O (an assert would vanish, and the timings with it stand).
    if not diff < 1e-4:
        raise RuntimeError(f"{name}: cached and recomputed clips differ by {diff}")
    if not torch.equal(cached(), cached_with_read()):
        raise RuntimeError(f"{name}: reading the cache again changed the clip")
    t_cached, t_full, t_read = interleaved_ms([cached, recompute, cached_with_read], repeats)
    out = {
        "max_abs_diff": diff,
        "cached_step_ms": round(t_cached, 2),
        "cached_step_with_cache_read_ms": round(t_read, 2),
        "speedup_with_cache_read_each_step": round(t_full / t_read, 3),
        "recompute_step_ms": round(t_full, 2),
        "speedup_at_full_context": round(t_full / t_cached, 3),
        "flop_ratio": total / cfg.clip_len,
    }
    if clip_steps:
        # A whole clip: the cached path also reads the cache once and runs the write pass
        # (one more forward of the clip) that recomputing never needs. Its own cache, kept
        # full: each write evicts the oldest clip.
        clip_cache = KVCache(model.cache_spec())
        s2 = clip_cache.add_stream()
        for k in range(cfg.window_clips):
            model.write(context[:, k * cfg.clip_len : (k + 1) * cfg.clip_len], clip_cache, [s2])

        def cached_clip() -> None:
            shared_clip = model.prepare_context(clip_cache, [s2])
            for _ in range(clip_steps):
                model(noisy, cond, shared_clip)
            model.write(noisy, clip_cache, [s2])

        def recompute_clip() -> None:
            for _ in range(clip_steps):
                recompute()

        t_clip, t_full_clip = interleaved_ms([cached_clip, recompute_clip], max(3, repeats // 2))
        out.update(
            clip_steps=clip_steps,
            cached_clip_ms=round(t_clip, 1),
            recompute_clip_ms=round(t_full_clip, 1),
            speedup_per_clip=round(t_full_clip / t_clip, 3),
        )
    return out


def flatness(ar_steps: int, repeats: int) -> dict[str, float]:
    """Milliseconds of an AR step (denoise, 4 Euler steps, + write) of the tiny model early in
    a stream (step 4 on, the window just full) and late (step ``ar_steps`` on): the stream is
    run to ``ar_steps``, its state at step 4 restored beside it from a snapshot, and the two
    are stepped in turn ``repeats`` times, so that a load from other processes falls on both
    alike; the medians are compared."""
    model = randomize_(CausalVideoDiT(CA2VDM_CONFIGS["tiny"]), seed=0, std=0.02)
    gen = DiffusionClipGenerator(model, KLAutoencoder(KL_CONFIGS["tiny"]), max_streams=2)
    frames = (ar_steps + repeats + 1) * 8
    late = gen.open(GenerationRequest(frames=frames, label=2, steps=4, guidance=1.0))
    early_state = None
    for k in range(ar_steps - 1):
        if k == 3:  # three clips made: the window (24 frames) is full from AR step 4 on
            early_state = gen.snapshot(late)
        gen.step([late])
    early = gen.restore(early_state)
    gen.step([early])  # warm both
    gen.step([late])
    times: dict[str, list[float]] = {"early": [], "late": []}
    for _ in range(repeats):
        for name, stream in (("early", early), ("late", late)):
            start = time.perf_counter()
            gen.step([stream])
            times[name].append(time.perf_counter() - start)
    first = 5
    return {
        f"ar_steps_{first}_to_{first + repeats - 1}_ms": round(
            statistics.median(times["early"]) * 1e3, 2
        ),
        f"ar_steps_{ar_steps + 1}_to_{ar_steps + repeats}_ms": round(
            statistics.median(times["late"]) * 1e3, 2
        ),
        "cached_step_flatness": round(
            statistics.median(times["late"]) / statistics.median(times["early"]), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,base")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ar-steps", type=int, default=52)
    parser.add_argument("--threads", type=threads, default=1, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--clip-steps", type=int, default=12, help="denoising steps of the per-clip figure (tiny)"
    )
    args = parser.parse_args()
    unknown = sorted(set(args.configs.split(",")) - set(CA2VDM_CONFIGS))
    if unknown:  # a KeyError, after the other configs had run
        parser.error(f"--configs: unknown {unknown}; known: {sorted(CA2VDM_CONFIGS)}")
    if args.repeats < 1 or args.clip_steps < 0:
        parser.error("--repeats must be >= 1 and --clip-steps >= 0")
    if args.ar_steps < 4 + args.repeats:  # the early steps (5 on) must end before the late
        parser.error(f"--ar-steps must be >= 4 + --repeats = {4 + args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result: dict[str, object] = {
        "machine": describe_machine(),
        "threads": torch.get_num_threads(),
    }
    for name in args.configs.split(","):
        result[name] = compare(name, args.repeats, args.clip_steps if name == "tiny" else 0)
    result["tiny_ar"] = flatness(args.ar_steps, args.repeats)
    if "tiny" in result:  # the figures are the tiny config's
        result["speedup_at_full_context"] = result["tiny"]["speedup_at_full_context"]
        if args.clip_steps:
            result["speedup_per_clip"] = result["tiny"]["speedup_per_clip"]
    result["cached_step_flatness"] = result["tiny_ar"]["cached_step_flatness"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()

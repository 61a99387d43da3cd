"""Quality of the shipped generators against the BouncingShapes ground truth.

Usage: python benchmarks/quality.py [--models ca2vdm-tiny,nbp-tiny] [--frames 512]
                                    [--labels 1,2,3,4] [--seeds 0] [--steps 12]
                                    [--guidance 2] [--temperature 1] [--top-k 0] [--top-p 1]

For each model, label (the number of shapes) and seed: one video of ``--frames`` frames made
in process with ``generate_video``; scored by pixels alone (vidgen.eval.scene): count accuracy
against the label, mean object speed over the world's true mean speed, the fraction of frame
transitions whose objects move (a frozen video scores 0), and the seam ratio at clip
boundaries (1 = as smooth as inside clips; None = static). For the token family the seam ratio
of LARP's own round trip of real consecutive clips is measured too (independent per-clip
decoding can cause seams), as the baseline its target is relative to.

Prints one JSON object last: per model the mean of each figure over labels and seeds, and the
per-label figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from vidgen import checkpoint
from vidgen.data.worlds import to_model_range, to_uint8
from vidgen.eval.scene import scene_metrics, seam_ratio
from vidgen.generators import GenerationRequest, generate_video, load_generator
from vidgen.worlds.bouncing import BOUNCING_PALETTE, BouncingShapes, BouncingShapesConfig

TRUE_SPEED = (BouncingShapesConfig().min_speed + BouncingShapesConfig().max_speed) / 2


def score_video(frames: np.ndarray, label: int, clip_len: int) -> dict[str, float | None]:
    return scene_metrics(
        frames, BOUNCING_PALETTE, expected_count=label, clip_len=clip_len, true_speed=TRUE_SPEED
    )


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return round(statistics.fmean(kept), 4) if kept else None


def evaluate_model(
    name: str,
    frames: int,
    labels: list[int],
    seeds: list[int],
    steps: int,
    guidance: float,
    **sampling: float,
) -> dict[str, object]:
    """``sampling``: token-sampling fields of the request (temperature, top_k, top_p)."""
    gen = load_generator(name, max_streams=1)
    per_label: dict[str, dict[str, float | None]] = {}
    rows = []
    start = time.perf_counter()
    for label in labels:
        scores = []
        for seed in seeds:
            request = GenerationRequest(
                model=name,
                frames=frames,
                seed=seed,
                label=label,
                steps=steps,
                guidance=guidance,
                **sampling,
            )
            video = np.concatenate([c.frames for c in generate_video(gen, request)])
            scores.append(score_video(video, label, gen.clip_len))
        per_label[str(label)] = {k: mean([s[k] for s in scores]) for k in scores[0]}
        rows += scores
    seconds = time.perf_counter() - start
    summary = {k: mean([r[k] for r in rows]) for k in rows[0]}
    summary["frames_per_s"] = round(frames * len(labels) * len(seeds) / seconds, 2)
    summary["sha256"] = checkpoint.file_sha256(checkpoint.resolve(name))[:16]
    return {"summary": summary, "per_label": per_label}


@torch.no_grad()
def tokenizer_seam_baseline(name: str, frames: int, seeds: list[int]) -> float | None:
    """Seam ratio of LARP's round trip of real consecutive BouncingShapes clips."""
    gen = load_generator(name, max_streams=1)
    tokenizer, clip_len = gen.tokenizer, gen.clip_len
    ratios = []
    for seed in seeds:
        world = BouncingShapes(BouncingShapesConfig(), seed=1000 + seed)
        video = to_model_range(world.trajectory(frames).frames)  # (T, 3, H, W)
        clips = video.reshape(-1, clip_len, *video.shape[1:])
        recon = torch.cat([tokenizer.decode(tokenizer.encode(c[None])) for c in clips], dim=1)
        ratios.append(seam_ratio(to_uint8(recon[0]).numpy(), clip_len))
    return mean(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ca2vdm-tiny,nbp-tiny")
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--labels", default="1,2,3,4")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--temperature", type=float, default=1.0, help="token models")
    parser.add_argument("--top-k", type=int, default=0, help="token models; 0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="token models; 1 = off")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = [int(x) for x in args.labels.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    result: dict[str, object] = {
        "frames": args.frames,
        "labels": labels,
        "seeds": seeds,
        "steps": args.steps,
        "guidance": args.guidance,
        **sampling,
        "true_mean_speed": TRUE_SPEED,
        "machine": f"{platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}",
    }
    for name in args.models.split(","):
        try:
            checkpoint.resolve(name)
        except checkpoint.CheckpointError as err:
            result[name] = {"error": str(err)}
            continue
        result[name] = evaluate_model(
            name, args.frames, labels, seeds, args.steps, args.guidance, **sampling
        )
        if name.startswith("nbp"):
            baseline = tokenizer_seam_baseline(name, min(args.frames, 256), seeds)
            result[name]["summary"]["tokenizer_roundtrip_seam_ratio"] = baseline
            seam = result[name]["summary"].get("seam_ratio")
            if baseline and seam:
                result[name]["summary"]["seam_ratio_over_roundtrip"] = round(seam / baseline, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

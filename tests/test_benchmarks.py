"""benchmarks/quality.py's pieces on test-size models (the figures themselves are measured by
running the benchmark; here: what it asks the generators for)."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.models import save_test_generators

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
quality = pytest.importorskip("quality")


def spy_requests(monkeypatch) -> list:
    """The requests quality.py makes from now on, in order."""
    requests = []
    real_generate = quality.generate_video

    def spy(gen, request):
        requests.append(request)
        return real_generate(gen, request)

    monkeypatch.setattr(quality, "generate_video", spy)
    return requests


@pytest.mark.parametrize("family", ["diffusion", "tokens"])
def test_quality_continues_real_videos_of_the_models_size(family, tmp_path, monkeypatch):
    path = save_test_generators(tmp_path)[family]
    requests = spy_requests(monkeypatch)
    clip = quality.load_generator(path).clip_len
    out = quality.evaluate_model(path, 2 * clip, [2], [0, 1], 2, 1.0, context=clip)
    assert [r.seed for r in requests] == [0, 1]
    for r in requests:
        # The model's frame size (32 px for the test models), the label's number of shapes.
        assert r.context.shape == (clip, 32, 32, 3) and r.context.dtype == np.uint8
        world = quality.BouncingShapes(
            quality.BouncingShapesConfig(num_shapes=2, size=32), seed=2000 + r.seed
        )
        assert np.array_equal(r.context, world.trajectory(clip).frames)
    assert 0 <= out["summary"]["count_accuracy"] <= 1
    # Each video named by label, seed and the digest of its bytes, beside its own figures.
    assert [(v["label"], v["seed"]) for v in out["videos"]] == [(2, 0), (2, 1)]
    again = quality.evaluate_model(path, 2 * clip, [2], [0, 1], 2, 1.0, context=clip)
    assert again["videos"] == out["videos"]  # seeded: the same bytes, the same figures
    assert out["videos"][0]["sha256"] != out["videos"][1]["sha256"]
    means = [v["count_accuracy"] for v in out["videos"]]
    assert out["summary"]["count_accuracy"] == pytest.approx(sum(means) / 2)
    requests.clear()
    quality.evaluate_model(path, 2 * clip, [1], [0], 2, 1.0)
    assert requests[0].context is None
    # The tokenizer round trip renders real videos at the model's size too.
    trip = quality.tokenizer_round_trip(path, 2 * clip, [1], [0])
    assert 0 <= trip["count_accuracy"] <= 1


@pytest.mark.parametrize("family", ["diffusion", "tokens"])
def test_quality_asks_diffusion_models_for_the_contrast_and_reports_it(
    family, tmp_path, monkeypatch
):
    path = save_test_generators(tmp_path)[family]
    requests = spy_requests(monkeypatch)
    clip = quality.load_generator(path).clip_len
    out = quality.evaluate_model(path, 2 * clip, [1], [0], 2, 1.0, contrast=1.5)
    if family == "diffusion":
        assert requests[0].contrast == 1.5 and out["summary"]["contrast"] == 1.5
        quality.evaluate_model(path, 2 * clip, [1], [0], 2, 1.0)  # unset: the model's default
        assert requests[1].contrast is None
        assert quality.evaluate_model(path, 2 * clip, [1], [0], 2, 1.0)["summary"]["contrast"] == 1
    else:  # token models have none: the flag leaves them as they are
        assert requests[0].contrast is None and "contrast" not in out["summary"]


def test_quality_sets_the_diffusion_samplers_eta_and_reports_it(tmp_path, monkeypatch):
    paths = save_test_generators(tmp_path)
    used = []
    real_generate = quality.generate_video

    def spy(gen, request):
        used.append(getattr(gen, "eta", None))
        return real_generate(gen, request)

    monkeypatch.setattr(quality, "generate_video", spy)
    clip = quality.load_generator(paths["diffusion"]).clip_len
    out = quality.evaluate_model(paths["diffusion"], 2 * clip, [1], [0], 2, 1.0, eta=0.5)
    assert used == [0.5] and out["summary"]["eta"] == 0.5
    plain = quality.evaluate_model(paths["diffusion"], 2 * clip, [1], [0], 2, 1.0)
    assert used[1] == 0.0 and plain["summary"]["eta"] == 0.0  # the card's (none: 0)
    assert out["summary"]["count_accuracy"] is not None
    with pytest.raises(ValueError, match="eta must be"):
        quality.evaluate_model(paths["diffusion"], 2 * clip, [1], [0], 2, 1.0, eta=-1.0)
    clip = quality.load_generator(paths["tokens"]).clip_len
    tokens = quality.evaluate_model(paths["tokens"], 2 * clip, [1], [0], 2, 1.0, eta=0.5)
    assert "eta" not in tokens["summary"] and used[2] is None


def test_quality_counts_videos_without_a_speed_and_leaves_them_out_of_the_mean(
    tmp_path, monkeypatch
):
    path = save_test_generators(tmp_path)["diffusion"]
    clip = quality.load_generator(path).clip_len
    scores = iter(
        [
            {"count_accuracy": 1.0, "speed_ratio": 2.0, "mean_speed": 3.0, "speed_pairs": 10},
            {"count_accuracy": 0.0, "speed_ratio": None, "mean_speed": 0.0, "speed_pairs": 0},
        ]
    )
    monkeypatch.setattr(quality, "score_video", lambda *args: next(scores))
    out = quality.evaluate_model(path, 2 * clip, [1], [0, 1], 2, 1.0)
    summary = out["summary"]
    assert summary["speed_ratio"] == 2.0 and summary["speed_ratio_undefined"] == 1
    assert [v["speed_ratio"] for v in out["videos"]] == [2.0, None]


def test_quality_lists_a_slideshows_infinite_seam_ratio_in_strict_json(tmp_path, monkeypatch):
    import json

    path = save_test_generators(tmp_path)["diffusion"]
    clip = quality.load_generator(path).clip_len
    score = {"count_accuracy": 1.0, "speed_ratio": 1.0, "seam_ratio": float("inf")}
    monkeypatch.setattr(quality, "score_video", lambda *args: dict(score))
    out = quality.evaluate_model(path, 2 * clip, [1], [0], 2, 1.0)
    assert out["videos"][0]["seam_ratio"] == "inf"
    assert out["summary"]["seam_ratio_infinite"] == 1
    json.dumps(out["videos"], allow_nan=False)  # raises on Infinity


def test_tokenizer_benchmark_reports_unmeasurable_figures_as_null():
    tokenizer = pytest.importorskip("tokenizer")
    assert tokenizer._rounded(None) is None and tokenizer._rounded(float("nan")) is None
    assert tokenizer._rounded(float("inf")) is None and tokenizer._rounded(1.23456) == 1.2346


@pytest.mark.parametrize("stutter", [False, True])
def test_tokenizer_benchmark_reports_reconstructions_standing_still_inside_patches(
    stutter, monkeypatch
):
    """moving_fraction_<world>: a round trip giving each pair of frames (a temporal patch) the
    same picture, as larp-tiny does, moves in about half the transitions inside
    clips; the videos themselves in all."""
    from vidgen.nn import randomize_
    from vidgen.tokenizers.larp import LARPConfig, LARPTokenizer, LARPVideoTokenizer

    bench = pytest.importorskip("tokenizer")
    cfg = LARPConfig(channels=3, size=64, frames=8, patch=16, autoencoder="", dim=16)
    cfg = dataclasses.replace(cfg, enc_depth=1, dec_depth=1, heads=2, num_tokens=4)
    cfg = dataclasses.replace(cfg, codebook_size=8, code_dim=4, prior_dim=16, prior_depth=1)
    tok = LARPVideoTokenizer(randomize_(LARPTokenizer(cfg), seed=0, std=0.1), None)
    seen: list[torch.Tensor] = []
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda clips: seen.append(clips) or real_encode(clips))

    def decode_video(ids):  # the clips encoded, each pair of frames made its first
        clips = seen.pop()
        if stutter:
            clips = clips[:, ::2].repeat_interleave(2, dim=1)
        return clips.reshape(1, -1, *clips.shape[2:])

    monkeypatch.setattr(tok, "decode_video", decode_video)
    out, _ = bench.evaluate_world(tok, "bouncing", 2, 16)
    assert out["moving_fraction_real_bouncing"] == 1.0
    if stutter:
        assert 0.4 <= out["moving_fraction_bouncing"] <= 0.6 and out["psnr_bouncing"] < 40
    else:
        assert out["moving_fraction_bouncing"] == 1.0 and out["psnr_bouncing"] > 40


def test_quality_pools_the_speed_ratio_over_object_pairs():
    """A mean of per-video ratios let a video with one pair (a speck seen twice) weigh as
    much as a full one: 1.0 and 20 averaged to 10.5."""
    full = {"mean_speed": 1.5, "speed_pairs": 200, "speed_ratio": 1.0, "count_accuracy": 1.0}
    speck = {"mean_speed": 30.0, "speed_pairs": 1, "speed_ratio": 20.0, "count_accuracy": 0.0}
    empty = {"mean_speed": 0.0, "speed_pairs": 0, "speed_ratio": None, "count_accuracy": 0.0}
    out = quality.aggregate([full, speck, empty])
    assert out["speed_ratio"] == pytest.approx((1.5 * 200 + 30) / 201 / quality.TRUE_SPEED, 1e-3)
    assert out["speed_pairs"] == 201 and out["count_accuracy"] == pytest.approx(1 / 3, 1e-3)
    assert quality.aggregate([empty])["speed_ratio"] is None


@pytest.mark.parametrize("family", ["diffusion", "tokens"])
def test_dtype_benchmark_compares_the_two_dtypes_of_one_model(family, tmp_path):
    import dtype

    model = save_test_generators(tmp_path)[family]
    got = dtype.measure(model, frames=16, streams=2, device="cpu", repeats=2)
    assert got["float32_frames_per_s"] > 0 and got["bfloat16_frames_per_s"] > 0
    assert got["repeats"] == 2
    assert got["cache_ratio"] == 0.5
    assert got["bfloat16_cache_bytes"] * 2 == got["float32_cache_bytes"]
    if family == "diffusion":  # the same noise: rounding apart, not another video
        assert 0 < got["first_clip_mean_abs_diff"] < 8
    else:
        assert "first_clip_mean_abs_diff" not in got


@pytest.mark.parametrize("family", ["diffusion", "tokens"])
def test_quality_scores_a_bfloat16_generator_and_its_round_trip(family, tmp_path, monkeypatch):
    path = save_test_generators(tmp_path)[family]
    made = []
    real_load = quality.load_generator

    def spy(*args, **kwargs):
        made.append(real_load(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(quality, "load_generator", spy)
    clip = real_load(path).clip_len
    out = quality.evaluate_model(path, 2 * clip, [1], [0], 2, 1.0, dtype="bfloat16")
    trip = quality.tokenizer_round_trip(path, 2 * clip, [1], [0], dtype="bfloat16")
    assert [g.dtype for g in made] == [torch.bfloat16, torch.bfloat16]
    assert 0 <= out["summary"]["count_accuracy"] <= 1 and 0 <= trip["count_accuracy"] <= 1


def test_fvd_clips_spread_over_videos_and_their_length():
    # Frame i of video v holds the value 100 v + i // 16: each clip says where it came from.
    videos = [
        (100 * v + np.arange(64 + 8 * v)[:, None, None, None] // 16).astype(np.uint8)
        * np.ones((1, 2, 2, 3), np.uint8)
        for v in range(2)
    ]
    clips = quality.fvd_clips(videos, 5)
    assert clips.shape == (5, 16, 2, 2, 3)
    assert (clips == clips[:, :1]).all()  # whole clips, never across a clip boundary
    # An even share of each video (the odd clip to the second), spread over its length with
    # each video's grid shifted by its own phase.
    assert [int(c[0, 0, 0, 0]) for c in clips] == [0, 2, 101, 102, 103]
    # One clip per video: between them they still cover the whole length.
    many = [np.repeat(np.arange(32, dtype=np.uint8), 16)[:, None, None, None]] * 16
    assert sorted(int(c[0, 0, 0, 0]) for c in quality.fvd_clips(many, 16)) == list(range(1, 32, 2))
    with pytest.raises(SystemExit, match="only 8 clips"):
        quality.fvd_clips(videos, 9)


@pytest.mark.usefixtures("all_threads")
def test_tokenizer_fvd_of_a_perfect_reconstruction_is_zero():
    """tokenizer.py --fvd: reconstructions equal to the videos score 0, and the floor (other
    held-out videos of the world) does not."""
    from vidgen.eval.fvd import FVDError, i3d_weights_path

    try:
        i3d_weights_path()
    except FVDError as err:
        pytest.skip(str(err))
    bench = pytest.importorskip("tokenizer")
    # 2 videos of one clip (an I3D pass takes about a second here).
    videos = [v for v, *_ in bench.world_videos("bouncing", 2, 16)]
    out = bench.world_fvd("bouncing", [(v, v.copy()) for v in videos], 64)
    assert out["fvd_clips_bouncing"] == 2
    assert out["fvd_bouncing"] < 1e-6 < 1.0 < out["fvd_floor_bouncing"]
    # KVD leaves self-pairs out, so a set against its copy scores below 0, not 0.
    assert out["kvd_bouncing"] < 0 < out["kvd_floor_bouncing"]


def test_eval_memory_benchmark_runs_and_compares_equal_figures():
    """benchmarks/eval_memory.py end to end on a short video (one length: each way of scoring
    is a fresh Python process of seconds): both ways of scoring agree (it exits non-zero
    otherwise) and it prints its JSON last."""
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_memory.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--frames", "40", "--size", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["frames"] == [40] and out["streamed_peak_mb_40"] > 0
    assert {"streamed_growth", "whole_growth", "whole_over_streamed"} <= set(out)
    assert "torch threads" in out["machine"]


def test_the_machine_line_names_the_cpu_model_threads_and_torch(monkeypatch):
    """Generated videos need not be bit-equal across CPU kinds and kernel levels, and a long
    rollout amplifies the last bits: a figure's machine line names the processor model,
    torch's CPU capability, the torch threads and torch's version."""
    from vidgen import machine

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    line = machine.describe_machine()
    assert line.startswith(machine.cpu_model())
    assert "3 torch threads" in line and f"torch {torch.__version__}" in line
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"({capability})" in line
    if Path("/proc/cpuinfo").exists():  # Linux: the model name, not the architecture
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        if names:
            assert machine.cpu_model() == names[0].split(":", 1)[1].strip()


def test_cache_benchmark_times_a_whole_clip_with_its_read_and_write():
    """The per-step figure leaves out what only the cached path pays once per clip (reading
    the cache, the write pass); the per-clip figure counts them. Both paths must first agree
    (the script asserts it), and the write must keep the timed cache full."""
    import cache

    got = cache.compare("test", repeats=1, clip_steps=2)
    assert got["max_abs_diff"] < 1e-4 and got["clip_steps"] == 2
    assert got["cached_clip_ms"] > 0 and got["recompute_clip_ms"] > 0
    ratio = got["recompute_clip_ms"] / got["cached_clip_ms"]  # of the rounded times
    assert got["speedup_per_clip"] == pytest.approx(ratio, rel=0.05)
    assert "speedup_per_clip" not in cache.compare("test", repeats=1)


def test_nbp_benchmark_runs_any_config_and_names_a_block_that_does_not_divide():
    """--config test could never run: the tokenizer was always the tiny LARP's shape."""
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "nbp.py"

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(script), "--config", "test", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    proc = run("--clips", "1")  # the config's own block (4), not 16
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"] == "test" and out["steps_per_clip_nbp"] == 2
    assert out["steps_ratio"] == 4 and out["speedup_vs_ntp"] > 0
    refused = run("--block", "16")
    assert refused.returncode == 2 and "--block must divide the 8 tokens" in refused.stderr


@pytest.mark.parametrize("frames", ["6", "4"])
def test_tokenizer_benchmark_names_frames_that_are_not_two_clips_or_more(
    frames, tmp_path, monkeypatch, capsys
):
    """--frames 6 failed inside the first world with a reshape error, --frames 4 (one clip)
    only after every round trip, in the seam ratio."""
    bench = pytest.importorskip("tokenizer")
    save_test_generators(tmp_path)
    model = str(tmp_path / "larp-test.safetensors")
    monkeypatch.setattr(sys, "argv", ["tokenizer.py", "--model", model, "--frames", frames])
    with pytest.raises(SystemExit) as exited:
        bench.main()
    assert exited.value.code == 2
    assert "--frames must be a multiple of the clip length 4, at least 8" in (
        capsys.readouterr().err
    )


def test_actor_start_benchmark_names_restarts_it_cannot_time():
    """benchmarks/actor_start.py (its run starts two Ray instances: not in the suite) takes a
    median over --restarts: none is refused before any Ray starts."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "actor_start.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--restarts", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--restarts must be >= 1, got 0" in proc.stderr


def test_benchmark_flags_are_checked_by_argparse_and_a_failed_child_says_why(capsys):
    """--repeats -1, --threads -1, --seeds '' or --configs foo ended in tracebacks from deep
    inside a run (or, --repeats 0, were replaced without a word); a child process that
    failed raised a bare CalledProcessError, its own error dropped."""
    import argparse
    import subprocess

    import _args

    assert _args.int_list("0, 2,3") == [0, 2, 3] and _args.threads("0") == 0
    for check, text in (
        (_args.positive_int, "0"),
        (_args.threads, "-1"),
        (_args.int_list, ""),
        (_args.int_list, "1,x"),
        (_args.device, "bogus"),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            check(text)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
    for flag, value in (("--repeats", "0"), ("--dtype", "foo")):
        done = subprocess.run(
            [sys.executable, str(script), flag, value], capture_output=True, text=True
        )
        assert done.returncode == 2 and f"argument {flag}" in done.stderr, done.stderr[-500:]
    # Each of these was a traceback after minutes of work (quality.py scored the real videos
    # before loading a generator in --dtype fp32) or after the models were loaded.
    for name, flag, value, said in (
        ("quality.py", "--dtype", "fp32", "argument --dtype"),
        ("quality.py", "--device", "bogus", "argument --device"),
        ("quality.py", "--seeds", "0,1000", "--seeds must be in 0..999"),
        ("dtype.py", "--frames", "12", "--frames must be whole 8-frame clips"),
        ("eval_memory.py", "--frames", "0", "--frames must be >= 1"),
        ("serving.py", "--memory-frames", "500,x", "argument --memory-frames"),
    ):
        done = subprocess.run(
            [sys.executable, str(script.parent / name), flag, value], capture_output=True, text=True
        )
        assert done.returncode == 2 and said in done.stderr, (name, done.stderr[-500:])
    with pytest.raises(SystemExit) as failed:
        _args.child_stdout([sys.executable, "-c", "raise SystemExit('steps must be >= 1')"])
    assert "a child run failed (exit 1)" in str(failed.value)
    assert "steps must be >= 1" in str(failed.value)


def test_context_videos_are_scored_against_their_own_worlds_speeds():
    """A --context video continues a known world: scored against the mean over all worlds
    (1.5), a perfect continuation's speed ratio was 0.93 (0.86 for label 3)."""
    from vidgen.eval.scene import summarize_videos

    labels, seeds = [1, 2, 3, 4], [0, 1]
    perfect = quality.real_continuations(128, labels, seeds, 16, 8)
    assert 0.97 < perfect["speed_ratio"] < 1.03
    rows = []
    for label in labels:
        for seed in seeds:
            world = quality.context_world(label, seed)
            rows.append(quality.score_video(world.trajectory(144).frames[16:], label, 8))
    assert abs(quality.aggregate(rows)["speed_ratio"] - perfect["speed_ratio"]) > 0.03
    # Per-video true speeds pool as pairs x speed; one number for all is the former figure.
    a = {"mean_speed": 2.0, "speed_pairs": 10, "speed_ratio": 1.0}
    b = {"mean_speed": 1.0, "speed_pairs": 30, "speed_ratio": 1.0}
    assert summarize_videos([a, b], [2.0, 1.0])["speed_ratio"] == 1.0
    assert summarize_videos([a, b], 1.25)["speed_ratio"] == 1.0
    assert summarize_videos([a, b], [2.0, None])["speed_ratio"] is None
    with pytest.raises(ValueError, match="one per video"):
        summarize_videos([a, b], [1.0])

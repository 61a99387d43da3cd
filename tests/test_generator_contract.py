"""The clip-generator contract (DESIGN.md section 3), checked on both families with test
sizes and random weights: determinism, snapshot/restore, batching, conditioning, memory."""

import dataclasses
import gc
import itertools
import types

import numpy as np
import pytest
import torch

from vidgen.data.worlds import to_model_range, to_uint8
from vidgen.generators import (
    DiffusionClipGenerator,
    GenerationRequest,
    StreamSnapshot,
    generate_video,
)
from vidgen.generators.tokens import TokenClipGenerator
from vidgen.models.ca2vdm import CA2VDM_CONFIGS, CausalVideoDiT
from vidgen.models.nbp import NBP_CONFIGS, NextBlockTransformer
from vidgen.nn import randomize_
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder
from vidgen.tokenizers.larp import LARP_CONFIGS, LARPTokenizer, LARPVideoTokenizer

# "tokens-reencode": the token family with requests that re-tokenise each sampled clip
# before it becomes context; "tokens-context": over a LARP whose decoder reads the previous
# clip's tokens. The whole contract holds for them too.
FAMILIES = ["diffusion", "tokens", "tokens-reencode", "tokens-context"]


def make_generator(family: str, max_streams: int = 4):
    autoencoder = randomize_(KLAutoencoder(KL_CONFIGS["test"]), seed=2, std=0.1)
    if family == "diffusion":
        model = randomize_(CausalVideoDiT(CA2VDM_CONFIGS["test"]), seed=1)
        return DiffusionClipGenerator(model, autoencoder, max_streams=max_streams)
    larp_cfg = LARP_CONFIGS["test"]
    if family == "tokens-context":
        larp_cfg = dataclasses.replace(larp_cfg, context_decoder=True)
    larp = randomize_(LARPTokenizer(larp_cfg), seed=3, std=0.1)
    model = randomize_(NextBlockTransformer(NBP_CONFIGS["test"]), seed=1)
    tokenizer = LARPVideoTokenizer(larp, autoencoder)
    gen = TokenClipGenerator(model, tokenizer, max_streams)
    gen.test_reencode = family == "tokens-reencode"  # read by request_for
    return gen


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def request_for(gen, **kwargs) -> GenerationRequest:
    base = dict(model="test", frames=6 * gen.clip_len, seed=5, label=2, steps=3, guidance=2.0)
    base["reencode"] = getattr(gen, "test_reencode", False)
    base.update(kwargs)
    return GenerationRequest(**base)


def clips_of(gen, req: GenerationRequest) -> torch.Tensor:
    return clips_of_stream(gen, gen.open(req))


def clips_of_stream(gen, stream) -> torch.Tensor:
    """The rest of ``stream``'s clips (it is closed after)."""
    out = []
    while not stream.done:
        (clip,) = gen.step([stream])
        out.append(clip.data)
    gen.close(stream)
    return torch.stack(out)


def batched_clips(gen, reqs: list[GenerationRequest], stagger: bool = False) -> list:
    """Each request's clips, made with its streams stepped together (``stagger``: stream j
    joins after j clips); the streams are closed after."""
    streams = [gen.open(r) for r in reqs]
    made: dict[int, list[torch.Tensor]] = {s.id: [] for s in streams}
    joined = 0
    while not all(s.done for s in streams):
        joined += 1
        active = [s for j, s in enumerate(streams) if (j < joined or not stagger) and not s.done]
        for clip in gen.step(active):
            made[clip.stream].append(clip.data)
    for s in streams:
        gen.close(s)
    return [torch.stack(made[s.id]) for s in streams]


def test_same_request_same_frames_and_nontrivial(family):
    gen = make_generator(family)
    a = [c.frames for c in generate_video(gen, request_for(gen))]
    b = [c.frames for c in generate_video(gen, request_for(gen))]
    assert len(a) == 6 and a[0].shape == (gen.clip_len, 32, 32, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert np.std(np.concatenate(a).astype(float)) > 1.0
    c = [c.frames for c in generate_video(gen, request_for(gen, seed=6))]
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_snapshot_restore_continues_bit_identically(family, guidance):
    gen = make_generator(family)
    req = request_for(gen, guidance=guidance)
    whole = clips_of(gen, req)
    stream = gen.open(req)
    gen.step([stream])
    snap = gen.snapshot(stream)  # checkpoint after clip 0; clips 1 and 2 follow
    for _ in range(2):
        (clip,) = gen.step([stream])
        snap.add(clip)
    gen.close(stream)
    other = make_generator(family)  # another actor with the same weights
    restored = other.restore(snap)
    assert restored.clip == 3
    rest = []
    while not restored.done:
        (clip,) = other.step([restored])
        rest.append(clip.data)
    assert torch.equal(torch.stack(rest), whole[3:])


def test_batched_streams_of_different_ages_equal_single_runs(family):
    gen = make_generator(family)
    # Each stream its own guidance and token sampling: a batch must not apply one stream's
    # settings (the first's, say) to the others.
    settings = [(1, 1.5, 1.0, 0), (2, 3.0, 0.7, 8), (3, 2.0, 1.3, 0)]
    reqs = [
        request_for(
            gen, seed=s, label=s % 4, frames=4 * gen.clip_len, guidance=g, temperature=t, top_k=k
        )
        for s, g, t, k in settings
    ]
    singles = [clips_of(gen, r) for r in reqs]
    streams = [gen.open(r) for r in reqs]
    made: dict[int, list[torch.Tensor]] = {s.id: [] for s in streams}
    # Stream 0 starts alone, stream 1 joins after one clip, stream 2 after two.
    for i in range(6):
        active = [s for j, s in enumerate(streams) if j <= i and not s.done]
        for clip in gen.step(active):
            made[clip.stream].append(clip.data)
    for s, single in zip(streams, singles, strict=True):
        got = torch.stack(made[s.id])
        if got.dtype.is_floating_point:
            torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)
        else:  # sampled tokens: logits agree within float tolerance, so the draws agree
            assert (got == single).float().mean() > 0.95
        gen.close(s)


def test_context_and_actions_condition_the_video(family):
    gen = make_generator(family)
    rng = np.random.default_rng(0)
    context = rng.integers(0, 256, (2 * gen.clip_len, 32, 32, 3), dtype=np.uint8)
    frames = 2 * gen.clip_len
    # Four seeds: through random weights a token model's context shifts its logits only a
    # little, so one video may differ in a single sampled token (one that a change of float
    # summation order, e.g. another thread count, can flip back); four differ in about ten.
    seeds = (5, 6, 7, 8)
    plain = torch.stack([clips_of(gen, request_for(gen, frames=frames, seed=s)) for s in seeds])
    with_context = torch.stack(
        [clips_of(gen, request_for(gen, frames=frames, context=context, seed=s)) for s in seeds]
    )
    assert not torch.equal(plain, with_context)
    acts = rng.integers(0, 5, frames)
    with_actions = clips_of(gen, request_for(gen, frames=frames, actions=acts))
    assert not torch.equal(plain[0], with_actions)


def test_actions_lead_to_the_next_frame(family):
    """Action t acts between frame t and t+1 (training's convention): new frame t is made
    under action t-1, frame 0 under ``context_action`` (null when unset), and the last
    action acts after the video ends."""
    gen = make_generator(family)
    L, frames = gen.clip_len, 3 * gen.clip_len
    acts = np.random.default_rng(0).integers(0, 5, frames)
    base = clips_of(gen, request_for(gen, frames=frames, actions=acts))

    def changed(i: int, **kwargs) -> torch.Tensor:
        other = acts.copy()
        other[i] = (other[i] + 1) % 5
        return clips_of(gen, request_for(gen, frames=frames, actions=other, **kwargs))

    assert torch.equal(changed(frames - 1), base)  # after the last frame: no effect
    last_of_clip_0 = changed(L - 1)  # leads to frame L, the first of clip 1
    assert torch.equal(last_of_clip_0[0], base[0]) and not torch.equal(last_of_clip_0[1], base[1])
    assert not torch.equal(changed(0)[0], base[0])  # leads to frame 1, inside clip 0

    context = np.random.default_rng(1).integers(0, 256, (L, 32, 32, 3), dtype=np.uint8)
    after = [
        clips_of(gen, request_for(gen, frames=frames, actions=acts, context=context, **kw))
        for kw in ({}, {"context_action": 3}, {"context_action": 4})
    ]
    assert not torch.equal(after[1][0], after[2][0]) and not torch.equal(after[0][0], after[1][0])
    with pytest.raises(ValueError, match="context_action .* needs actions"):
        request_for(gen, frames=frames, context=context, context_action=3)
    with pytest.raises(ValueError, match="context_action .* needs a context"):
        gen.open(request_for(gen, frames=frames, actions=acts, context_action=3))
    with pytest.raises(ValueError, match=r"context_action must be in \[0, 5\)"):
        gen.open(request_for(gen, frames=frames, actions=acts, context=context, context_action=9))
    with pytest.raises(ValueError, match="context_action must be one action"):
        request_for(gen, frames=frames, actions=acts, context=context, context_action=[1, 2])


def test_context_actions_condition_the_context(family):
    """``context_actions`` are the actions of the context's own frames, end-aligned: the last
    leads to new frame 0 (so one of them is ``context_action``), earlier ones shape the
    context's K/V, and those before the context's first frame are not used."""
    gen = make_generator(family)
    L, frames = gen.clip_len, 2 * gen.clip_len
    rng = np.random.default_rng(3)
    acts = rng.integers(0, 5, frames)
    context = rng.integers(0, 256, (2 * L, 32, 32, 3), dtype=np.uint8)
    history = rng.integers(0, 5, 2 * L)

    def run(**kwargs) -> torch.Tensor:
        # Four seeds: through random weights a token model's context moves its logits only
        # a little (see test_context_and_actions_condition_the_video).
        return torch.stack(
            [
                clips_of(
                    gen,
                    request_for(
                        gen, frames=frames, actions=acts, context=context, seed=seed, **kwargs
                    ),
                )
                for seed in (5, 6, 7, 8)
            ]
        )

    base = run(context_actions=history)
    assert not torch.equal(base, run())  # the context's frames no longer under the null action
    # Only the last: the same video as context_action, bit for bit.
    assert torch.equal(run(context_actions=history[-1:]), run(context_action=history[-1]))
    # The actions inside the first context clip (leading to its frames 1..L-1) shape what
    # follows.
    other = history.copy()
    other[: L - 1] = (other[: L - 1] + 1) % 5
    assert not torch.equal(run(context_actions=other), base)
    # A longer history: only one action per context frame is used (the one leading to the
    # context's first frame acts from a frame the model never sees; training's first frames
    # are made under the null action).
    longer = np.concatenate([rng.integers(0, 5, 5), [(history[0] + 1) % 5], history])
    assert torch.equal(run(context_actions=longer), base)

    with pytest.raises(ValueError, match="context_actions .* needs actions"):
        request_for(gen, frames=frames, context=context, context_actions=history)
    with pytest.raises(ValueError, match="context_action or context_actions, not both"):
        request_for(gen, frames=frames, actions=acts, context_action=1, context_actions=history)
    with pytest.raises(ValueError, match="context_actions must be one or more actions"):
        request_for(gen, frames=frames, actions=acts, context_actions=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="context_actions .* needs a context"):
        gen.open(request_for(gen, frames=frames, actions=acts, context_actions=history))
    with pytest.raises(ValueError, match=r"context_actions must be in \[0, 5\)"):
        gen.open(
            request_for(
                gen, frames=frames, actions=acts, context=context, context_actions=history + 5
            )
        )


def test_leading_actions_of_context_clips():
    """Frame f (negative: the context's) is made under the action between f - 1 and f:
    end-aligned ``context_actions[len + f - 1]``, the null action before the history."""
    from vidgen.generators.base import leading_actions
    from vidgen.nn.conditioning import NULL

    L = 4
    context = np.zeros((2 * L, 8, 8, 3), np.uint8)
    req = GenerationRequest(
        frames=L, actions=[10, 11, 12, 13], context=context, context_actions=[1, 2, 3, 4, 5, 6]
    )
    rows = [leading_actions(req, clip, L, 20, 0).tolist() for clip in (-2, -1, 0)]
    assert rows == [[NULL, NULL, NULL, 1], [2, 3, 4, 5], [6, 10, 11, 12]]
    # One per context frame (8): the first leads to the context's frame 1; more are not used.
    full = dataclasses.replace(req, context_actions=np.arange(30, 40))
    rows = [leading_actions(full, clip, L, 50, 0).tolist() for clip in (-2, -1, 0)]
    assert rows == [[NULL, 32, 33, 34], [35, 36, 37, 38], [39, 10, 11, 12]]
    cont = GenerationRequest(
        frames=L, actions=np.zeros((L, 2)), context=context, context_actions=np.ones((2, 2))
    )
    assert leading_actions(cont, -1, L, 0, 2)[:, 0].tolist() == [0, 0, 0, 1]
    assert leading_actions(cont, 0, L, 0, 2)[:, 0].tolist() == [1, 0, 0, 0]
    # In JSON (and so in every fingerprint and saved snapshot) when given, absent when not.
    assert GenerationRequest.from_json(req.to_json()).to_json() == req.to_json()
    assert req.to_json()["context_actions"] == [1, 2, 3, 4, 5, 6]
    assert "context_actions" not in GenerationRequest(frames=8).to_json()


def test_guidance_on_actions_alone(family):
    """Without a label, classifier-free guidance contrasts the actions with the null action:
    the unconditional rows must not see the actions."""
    gen = make_generator(family)
    frames = 2 * gen.clip_len
    acts = np.random.default_rng(2).integers(0, 5, frames)
    runs = [
        clips_of(gen, request_for(gen, frames=frames, label=None, actions=acts, guidance=g))
        for g in (1.0, 4.0)
    ]
    if runs[0].dtype.is_floating_point:
        assert (runs[0] - runs[1]).abs().max() > 1e-3
    else:
        assert not torch.equal(*runs)


def test_every_context_clip_shapes_the_cache(family):
    """A context longer than the window is written whole, oldest first: the oldest clip
    leaves the window but shaped the K/V of the clips after it (the banded reference)."""
    gen = make_generator(family)
    clips = gen.config.window_clips + 1
    rng = np.random.default_rng(3)
    context = rng.integers(0, 256, (clips * gen.clip_len, 32, 32, 3), dtype=np.uint8)
    other = context.copy()
    other[: gen.clip_len] = 255 - other[: gen.clip_len]  # only the evicted clip differs

    def cache_after_open(ctx: np.ndarray) -> dict[str, torch.Tensor]:
        stream = gen.open(request_for(gen, context=ctx))
        snap = gen.snapshot(stream)
        gen.close(stream)
        return snap.cache

    a, b = cache_after_open(context), cache_after_open(other)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bad_requests_are_named(family):
    gen = make_generator(family, max_streams=1)
    L = gen.clip_len
    with pytest.raises(ValueError, match=f"multiple of clip_len={L}"):
        gen.open(request_for(gen, frames=L + 1))
    with pytest.raises(ValueError, match="label"):
        gen.open(request_for(gen, label=9))
    with pytest.raises(ValueError, match="actions must be"):
        gen.open(request_for(gen, frames=L, actions=np.full(L, 7)))
    with pytest.raises(ValueError, match="context must be"):
        gen.open(request_for(gen, frames=L, context=np.zeros((L - 1, 32, 32, 3), np.uint8)))
    with pytest.raises(ValueError, match="actions must be int"):  # never silently truncated
        gen.open(request_for(gen, frames=L, actions=np.full(L, 1.9)))
    with pytest.raises(ValueError, match=r"context must be uint8 frames .* T >= 1"):
        request_for(gen, frames=L, context=np.zeros((0, 32, 32, 3), np.uint8))
    stream = gen.open(request_for(gen))
    with pytest.raises(RuntimeError, match="stream slots"):
        gen.open(request_for(gen, guidance=1.0, label=None))
    gen.close(stream)
    assert gen.step([]) == []


def test_a_failed_restore_frees_its_cache_slots(family):
    """A truth that does not load (here: its cache tensors cut short) fails with a clear
    error and leaves no stream behind, so the next restore still finds free slots."""
    gen = make_generator(family, max_streams=1)
    req = request_for(gen)
    stream = gen.open(req)
    gen.step([stream])
    snap = gen.snapshot(stream)
    gen.close(stream)
    broken = {k: v[..., :1] if v.ndim > 2 else v for k, v in snap.cache.items()}
    bad = dataclasses.replace(snap, cache=broken)
    for _ in range(3):  # max_streams=1: a leaked slot would make the next try "cache is full"
        with pytest.raises(ValueError, match="snapshot k must be torch.float32 of shape"):
            gen.restore(bad)
    restored = gen.restore(snap)
    assert restored.clip == 1
    if family.startswith("tokens"):  # a guided stream needs a second slot the truth lacks
        gen.close(restored)
        gen.guidance = 1.0
        stream = gen.open(request_for(gen, guidance=None))
        unguided = gen.snapshot(stream)
        gen.close(stream)
        other = make_generator(family, max_streams=1)  # default guidance 2
        with pytest.raises(
            ValueError, match=r"snapshot holds 1 cache slot\(s\), this stream needs 2"
        ):
            other.restore(unguided)
        assert other.restore(snap).clip == 1


def test_cache_memory_is_bounded_by_the_window(family):
    gen = make_generator(family, max_streams=1)
    stream = gen.open(request_for(gen, frames=12 * gen.clip_len, guidance=1.0))
    sizes = []
    while not stream.done:
        gen.step([stream])
        sizes.append(gen.cache.stream_nbytes(stream.slot))
    spec = gen.cache.spec
    full_after = spec.window // gen.clip_len
    assert sizes[full_after - 1 :] == [spec.bytes_per_frame * spec.window] * (12 - full_after + 1)
    assert gen.cache.nbytes == spec.nbytes


def test_snapshot_survives_a_file_round_trip(family, tmp_path):
    from vidgen.generators.base import load_snapshot, save_snapshot

    gen = make_generator(family)
    context = np.random.default_rng(1).integers(0, 256, (gen.clip_len, 32, 32, 3), np.uint8)
    req = request_for(
        gen, context=context, actions=np.arange(6 * gen.clip_len) % 5, context_action=2
    )
    whole = clips_of(gen, req)
    stream = gen.open(req)
    snap = gen.snapshot(stream)
    (clip,) = gen.step([stream])
    snap.add(clip)
    gen.close(stream)
    loaded = load_snapshot(save_snapshot(tmp_path / "truth.safetensors", snap))
    assert loaded.request.fingerprint() == req.fingerprint()
    restored = gen.restore(loaded)
    rest = [gen.step([restored])[0].data for _ in range(5)]
    assert torch.equal(torch.stack(rest), whole[1:])
    # A truth from the very start (no cache yet) restores by opening afresh.
    start = gen.restore(
        load_snapshot(save_snapshot(tmp_path / "s.safetensors", StreamSnapshot.start(req)))
    )
    assert torch.equal(gen.step([start])[0].data, whole[0])


def test_a_snapshot_file_whose_contents_do_not_fit_is_refused_by_name(tmp_path):
    """A file with a valid digest (the digest has no key, so an edit can be re-signed) but a
    pending count beyond its tensors, or a context that is not frames: a CheckpointError
    naming the file, never a bare KeyError or a request that skipped its checks."""
    from vidgen import checkpoint
    from vidgen.generators.base import load_snapshot, save_snapshot

    snap = StreamSnapshot(GenerationRequest(frames=8), 0, None, [torch.arange(4)])
    good = checkpoint.load(save_snapshot(tmp_path / "s.safetensors", snap))
    edits = {
        "pending": ({**good.config, "pending": 3}, dict(good.tensors)),
        "context": (good.config, {**good.tensors, "context": torch.zeros(3)}),
        # Counts out of range were taken (-1 pending as none), tensors the header does not
        # account for dropped without a word, a request nested past Python's limit a
        # RecursionError.
        "negative": ({**good.config, "pending": -1}, dict(good.tensors)),
        "unaccounted": (good.config, {**good.tensors, "pending.7": torch.arange(4)}),
        "cache": (good.config, {**good.tensors, "cache.k": torch.zeros(2)}),
        "nested": ({**good.config, "request": "[" * 100_000 + "]" * 100_000}, good.tensors),
        # Checked before the names it implies are made: 10**12 built a set that size
        "huge": ({**good.config, "pending": 10**12}, dict(good.tensors)),
    }
    for name, (config, tensors) in edits.items():
        path = tmp_path / f"{name}.safetensors"
        metadata = checkpoint._metadata(good.config_type, config, good.card)
        checkpoint._write(path, tensors, metadata)
        with pytest.raises(checkpoint.CheckpointError, match="is not a valid stream snapshot"):
            load_snapshot(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("frames", "8", r"frames must be an int >= 1, got '8'"),
        ("frames", 0, r"frames must be >= 1"),
        ("frames", True, r"frames must be an int"),
        ("seed", -1, r"seed must be >= 0"),
        ("steps", 2.5, r"steps must be an int >= 1"),
        ("label", "3", r"label must be an int"),
        ("guidance", float("nan"), r"guidance must be finite"),
        ("guidance", -1.0, r"guidance must be >= 0"),
        ("guidance", 1e39, r"guidance must be <= 100"),
        ("fps", 0, r"fps must be >= 1/1001"),
        ("fps", 1e-4, r"fps must be >= 1/1001"),
        ("fps", "8", r"fps must be a number"),
        ("temperature", -1.0, r"temperature must be in \[0, 100\]"),
        ("temperature", 1e39, r"temperature must be in \[0, 100\]"),
        ("top_k", -1, r"top_k must be >= 0"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("actions", 3, r"actions must have one entry per frame \(8\), got a scalar"),
        ("actions", ["a"] * 8, r"actions must be numbers"),
        ("actions", [[0.1, 0.2], [0.3]] + [[0.0, 0.0]] * 6, r"actions must be a rectangular"),
        ("actions", np.arange(8).astype("timedelta64[s]"), r"actions must be numbers"),
        ("model", None, r"model must be a shipped name or a checkpoint path, got None"),
        ("model", "", r"model must be a shipped name"),
        ("steps", 10**9, r"steps must be <= 1000"),
        ("fps", 2000, r"fps must be <= 1000"),
        ("temperature", 10**400, r"temperature must be finite"),
        ("guidance", 2**70 * 10**300, r"guidance must be finite"),
        # Past 4,300 digits Python cannot print an int: the fingerprint, the JSON and the
        # stream's seeds failed later without naming the field
        pytest.param(
            "seed",
            10**5000,
            r"seed must be <= 18446744073709551615, got an int of about 5001",
            id="seed-10**5000",
        ),
        ("seed", 2**64, r"seed must be <= 18446744073709551615"),
        ("frames", 2**60, r"frames must be <= 9007199254740992"),
        pytest.param("top_k", 10**5000, r"top_k must be <=", id="top_k-10**5000"),
        pytest.param("label", 10**5000, r"label must be <=", id="label-10**5000"),
    ],
)
def test_request_fields_are_checked_when_made(field, value, message):
    """A bad field fails when the request is made (before it takes a cache slot or joins a
    batch), naming the field and what was expected."""
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**{"frames": 8, field: value})


def test_valid_edge_values_are_accepted():
    GenerationRequest(frames=8, temperature=0)  # greedy token sampling
    context = np.zeros((8, 32, 32, 3), np.uint8)
    # A continuous context_action as JSON gives it (ints), and uint8 discrete actions.
    req = GenerationRequest(
        frames=8, actions=np.zeros((8, 2)), context=context, context_action=[0, 1]
    )
    assert req.to_json()["context_action"] == [0, 1]
    GenerationRequest(frames=8, actions=np.ones(8, np.uint8), context=context, context_action=3)
    # Without context_action the JSON form (and so every fingerprint) is as before it existed.
    assert "context_action" not in GenerationRequest(frames=8).to_json()


def test_request_numbers_keep_their_json_form():
    req = GenerationRequest(frames=np.int64(16), seed=np.int64(3), fps=8, guidance=2)
    assert req.to_json()["frames"] == 16 and type(req.to_json()["frames"]) is int
    assert GenerationRequest.from_json(req.to_json()).to_json() == req.to_json()


def test_reencode_emits_the_tokenizers_own_tokens_and_continues_from_them():
    """With ``reencode`` the first clip is the plain generator's sampled clip decoded and
    tokenised again, and the next clip is what a plain generator samples after that clip
    (teacher-forced as context), not after its own sample, re-tokenised in turn."""
    plain, re = make_generator("tokens"), make_generator("tokens")
    req = request_for(plain, frames=2 * plain.clip_len)
    re_req = request_for(plain, frames=2 * plain.clip_len, reencode=True)
    sampled = clips_of(plain, req)[0]
    tok = plain.tokenizer
    with torch.no_grad():
        expected = tok.encode(tok.decode(sampled[None]).clamp(-1, 1))[0]
    got = clips_of(re, re_req)
    assert torch.equal(got[0], expected) and not torch.equal(expected, sampled)
    # The K/V written after the first clip are those of the new tokens, not the sample's.
    caches = {}
    for name, gen in (("re", re), ("sampled", plain), ("replayed", plain)):
        gen.cache.k.zero_(), gen.cache.v.zero_()
        stream = gen.open(re_req if name == "re" else req)
        if name == "replayed":
            gen._replay(stream, expected, 0)
        else:
            gen.step([stream])
        caches[name] = (gen.cache.k.clone(), gen.cache.v.clone())
        gen.close(stream)
    assert all(torch.equal(a, b) for a, b in zip(caches["re"], caches["replayed"], strict=True))
    assert not torch.equal(caches["re"][0], caches["sampled"][0])
    # A plain stream whose first clip is replaced by the re-encoded tokens makes the same
    # second clip: the context written was the new tokens'.
    stream = plain.open(req)
    plain._replay(stream, expected, 0)
    stream.clip = 1
    (second,) = plain.step([stream])
    with torch.no_grad():
        second = tok.encode(tok.decode(second.data[None]).clamp(-1, 1))[0]
    assert torch.equal(second, got[1])


def test_reencode_and_plain_streams_batch_together():
    """One step over streams that re-tokenise and streams that do not (guided and not):
    each stream's clips and final cache (every slot, K/V and layout) equal its single run's,
    so each clip's K/V went to its own slots, once."""
    gen = make_generator("tokens")
    L = gen.clip_len
    reqs = [  # each guided stream its own scale and sampling: none takes another's
        request_for(gen, seed=1, frames=3 * L, reencode=True, guidance=1.5),
        request_for(gen, seed=2, frames=3 * L, guidance=3.0, temperature=0.7, top_k=8),
        request_for(gen, seed=3, frames=3 * L, reencode=True, guidance=1.0, top_p=0.9),
        request_for(gen, seed=4, frames=3 * L, guidance=2.0, temperature=1.3),
    ]

    def run(streams):
        made = {s.id: [] for s in streams}
        while not streams[0].done:
            for clip in gen.step(streams):
                made[clip.stream].append(clip.data)
        out = [(torch.stack(made[s.id]), gen.snapshot(s).cache) for s in streams]
        for s in streams:
            gen.close(s)
        return out

    singles = [run([gen.open(r)])[0] for r in reqs]
    batched = run([gen.open(r) for r in reqs])
    for (tokens, cache), (got, got_cache) in zip(singles, batched, strict=True):
        assert torch.equal(tokens, got)
        assert cache.keys() == got_cache.keys()
        for key, value in cache.items():  # K/V up to batching's float rounding
            if value.is_floating_point():
                torch.testing.assert_close(got_cache[key], value, atol=1e-5, rtol=0)
            else:
                assert torch.equal(got_cache[key], value), key
    plain = run([gen.open(request_for(gen, seed=1, frames=3 * L, guidance=1.5))])[0][0]
    assert not torch.equal(singles[0][0], plain)


def test_reencode_is_for_token_models_only():
    gen = make_generator("diffusion")
    with pytest.raises(ValueError, match="reencode applies to token models only"):
        gen.open(request_for(gen, reencode=True))
    with pytest.raises(ValueError, match="reencode must be true or false"):
        GenerationRequest(frames=8, reencode="yes")
    # Left out of the JSON (and so of the fingerprint) when off, as before it existed.
    assert "reencode" not in GenerationRequest(frames=8).to_json()
    on = GenerationRequest(frames=8, reencode=True)
    assert GenerationRequest.from_json(on.to_json()).reencode
    assert on.fingerprint() != GenerationRequest(frames=8).fingerprint()


def test_request_fingerprints_stay_as_recorded():
    """Render folders and sidecars made before a field was added still resume: requests
    that leave new fields at their defaults keep the fingerprints recorded on 2026-11-29.
    The guidance default moved from 2 to the model's own on 2026-11-30: those requests keep
    theirs with an explicit guidance=2 (an unset guidance is a new request, with no key)."""
    acts = np.arange(64) % 5
    assert GenerationRequest(frames=8, guidance=2.0).fingerprint() == (
        "6b759d9cb6eff0851f97c83554da6af1acb10aaa9858f5aba966ea35dd340e68"
    )
    # An int guidance was hashed as given; since fingerprints are canonical (1 and 1.0 are
    # one request) that form is the legacy one, which render folders still accept.
    assert GenerationRequest(frames=8, guidance=1).fingerprint(canonical=False) == (
        "f0b16ff2bb9203e6150fbd1d3226b3a7b7b7e8334085d55c666d8fa44e88c6ea"
    )
    req = GenerationRequest(
        model="nbp-tiny", frames=64, seed=3, label=2, actions=acts, temperature=0.7, guidance=2.0
    )
    assert req.fingerprint() == "bc0f506445f34a1e1f5574591f35fa933b8dc8975bca3f7d2dacad273f76622d"
    unset = GenerationRequest(frames=8)
    assert "guidance" not in unset.to_json()
    assert GenerationRequest.from_json(unset.to_json()).guidance is None
    assert unset.fingerprint() != GenerationRequest(frames=8, guidance=2.0).fingerprint()


def test_scale_contrast_scales_deviations_from_each_frames_median():
    from vidgen.sampling.flow import scale_contrast

    x = torch.randn(3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    out = scale_contrast(x, torch.tensor([1.0, 2.0, 0.5]))
    assert torch.equal(out[0], x[0])  # factor 1: exactly as it was
    median = x.flatten(3).median(dim=3).values[..., None, None]
    torch.testing.assert_close(out[1], median[1] + 2 * (x[1] - median[1]))
    torch.testing.assert_close(out[2] - median[2], 0.5 * (x[2] - median[2]))
    assert torch.equal(out[1].flatten(2).median(dim=2).values, median[1, ..., 0, 0])
    with pytest.raises(ValueError, match="latents must be"):
        scale_contrast(x[0], torch.tensor([2.0]))
    per_frame = scale_contrast(x, torch.tensor([[1.0, 2.0], [0.5, 1.0], [2.0, 2.0]]))
    assert torch.equal(per_frame[0, 0], x[0, 0]) and torch.equal(per_frame[1, 1], x[1, 1])
    torch.testing.assert_close(per_frame[0, 1], median[0, 1] + 2 * (x[0, 1] - median[0, 1]))
    torch.testing.assert_close(per_frame[1, 0], median[1, 0] + 0.5 * (x[1, 0] - median[1, 0]))
    torch.testing.assert_close(per_frame[2], scale_contrast(x, torch.full((3,), 2.0))[2])
    with pytest.raises(ValueError, match=r"factor must be \(b,\) or \(b, frames\)"):
        scale_contrast(x, torch.ones(3, 4))


def test_contrast_scales_the_emitted_clip_and_the_context_it_leaves():
    """The first clip is the plain clip with its contrast scaled; the second is, scaled in
    turn, what a plain stream makes after that scaled clip was written as its context; the
    generator's default applies to requests that leave contrast unset."""
    from vidgen.sampling.flow import scale_contrast

    gen = make_generator("diffusion")
    L = gen.clip_len
    plain = clips_of(gen, request_for(gen, frames=2 * L))
    assert torch.equal(plain, clips_of(gen, request_for(gen, frames=2 * L, contrast=1.0)))
    got = clips_of(gen, request_for(gen, frames=2 * L, contrast=1.5))
    expected = scale_contrast(plain[:1], torch.tensor([1.5]))[0]
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=0)
    stream = gen.open(request_for(gen, frames=2 * L))
    gen._write([stream], got[:1], [0])
    stream.clip = 1
    (second,) = gen.step([stream])
    gen.close(stream)
    assert not torch.equal(second.data, plain[1])  # the scaled context changed clip 1
    expected = scale_contrast(second.data[None], torch.tensor([1.5]))[0]
    torch.testing.assert_close(got[1], expected, atol=1e-6, rtol=0)
    gen.contrast = 1.5  # a model's default (its card's ``contrast``) for unset requests
    assert torch.equal(clips_of(gen, request_for(gen, frames=2 * L)), got)
    assert torch.equal(clips_of(gen, request_for(gen, frames=2 * L, contrast=1)), plain)


def test_contrast_streams_batch_with_plain_ones_and_restore_bit_identically():
    gen = make_generator("diffusion")
    L = gen.clip_len
    reqs = [
        request_for(gen, seed=1, frames=3 * L, contrast=1.3),
        request_for(gen, seed=2, frames=3 * L),
        request_for(gen, seed=3, frames=3 * L, contrast=0.8, guidance=1.0),
    ]
    singles = [clips_of(gen, r) for r in reqs]
    for got, single in zip(batched_clips(gen, reqs), singles, strict=True):
        torch.testing.assert_close(got, single, atol=1e-5, rtol=0)
    stream = gen.open(reqs[0])
    gen.step([stream])
    snap = gen.snapshot(stream)
    pending = [gen.step([stream])[0].data]
    gen.close(stream)
    snap = StreamSnapshot(snap.request, snap.checkpoint_clip, snap.cache, pending=pending)
    restored = gen.restore(snap)
    (last,) = gen.step([restored])
    assert torch.equal(last.data, singles[0][2])


def test_contrast_is_checked_and_for_diffusion_models_only():
    for bad, message in [
        (0, "contrast must be > 0"),
        (float("nan"), "contrast must be finite"),
        ("2", "contrast must be a number"),
        (10.5, "contrast must be <= 10"),
    ]:
        with pytest.raises(ValueError, match=message):
            GenerationRequest(frames=8, contrast=bad)
    gen = make_generator("tokens")
    with pytest.raises(ValueError, match="contrast applies to diffusion models only"):
        gen.open(request_for(gen, contrast=1.2))
    gen.close(gen.open(request_for(gen, contrast=1.0)))  # 1 = off: fine for any model
    with pytest.raises(ValueError, match="contrast must be > 0"):
        DiffusionClipGenerator(
            CausalVideoDiT(CA2VDM_CONFIGS["test"]),
            KLAutoencoder(KL_CONFIGS["test"]),
            contrast=-1.0,
        )
    # Left out of the JSON (and so of the fingerprint) when unset, as before it existed.
    assert "contrast" not in GenerationRequest(frames=8).to_json()
    on = GenerationRequest(frames=8, contrast=1.2)
    assert GenerationRequest.from_json(on.to_json()).contrast == 1.2
    assert on.fingerprint() != GenerationRequest(frames=8).fingerprint()


def test_unset_guidance_is_the_models_default(family):
    """A request without guidance takes its generator's (its card's ``guidance``, else 2): the
    same clips as asking for that value, on both families (the token family's second,
    unconditional cache slot included)."""
    gen = make_generator(family)
    assert gen.guidance == 2.0
    unset = clips_of(gen, request_for(gen, guidance=None, frames=3 * gen.clip_len))
    assert torch.equal(unset, clips_of(gen, request_for(gen, frames=3 * gen.clip_len)))
    gen.guidance = 1.0
    off = clips_of(gen, request_for(gen, guidance=None, frames=3 * gen.clip_len))
    assert torch.equal(off, clips_of(gen, request_for(gen, guidance=1.0, frames=3 * gen.clip_len)))
    assert not torch.equal(off, unset)
    assert torch.equal(clips_of(gen, request_for(gen, frames=3 * gen.clip_len)), unset)


def test_guidance_default_comes_from_the_card_and_is_checked(tmp_path):
    from tests.models import save_test_generators
    from vidgen import checkpoint
    from vidgen.generators import load_generator

    for path in save_test_generators(tmp_path).values():
        assert load_generator(path).guidance == 2.0  # a card without one
        checkpoint.update_card(path, {"guidance": 1.5})
        assert load_generator(path).guidance == 1.5
        checkpoint.update_card(path, {"guidance": -1})
        with pytest.raises(ValueError, match="guidance must be >= 0"):
            load_generator(path)
    for bad, message in [(-0.5, "guidance must be >= 0"), ("2", "guidance must be a number")]:
        with pytest.raises(ValueError, match=message):
            GenerationRequest(frames=8, guidance=bad)


def test_a_context_decoder_decodes_each_clip_with_the_previous_clips_tokens():
    gen = make_generator("tokens-context")
    req = request_for(gen, frames=4 * gen.clip_len)
    stream = gen.open(req)
    made = []
    while not stream.done:
        made += gen.step([stream])
    assert made[0].context is None  # a first clip has none
    for before, clip in itertools.pairwise(made):
        assert torch.equal(clip.context, before.data)
    frames = np.stack([c.frames for c in gen.decode(made)])
    alone = to_uint8(gen.tokenizer.decode(made[2].data[None])).numpy()[0]
    with_it = to_uint8(gen.tokenizer.decode(made[2].data[None], made[1].data[None])).numpy()[0]
    assert np.array_equal(frames[2], with_it) and not np.array_equal(frames[2], alone)
    # The same frames from generate_video, and from a stream restored mid-way.
    video = [c.frames for c in generate_video(gen, req)]
    assert all(np.array_equal(a, b) for a, b in zip(video, frames, strict=True))
    stream = gen.open(req)
    gen.step([stream])
    snap = gen.snapshot(stream)  # checkpoint after clip 0: its tokens are clip 1's context
    gen.close(stream)
    other = make_generator("tokens-context")
    restored = other.restore(snap)
    (clip,) = other.step([restored])
    assert torch.equal(clip.context, made[0].data) and torch.equal(clip.data, made[1].data)
    # Continuing a real video: the last context clip is the first generated clip's context.
    context = np.concatenate(video[:2])
    stream = gen.open(request_for(gen, frames=2 * gen.clip_len, context=context))
    (clip,) = gen.step([stream])
    last = gen.tokenizer.encode(to_model_range(video[1])[None])[0]
    assert torch.equal(clip.context, last)


def test_a_step_that_fails_part_way_changes_no_stream():
    """Streams of different ``steps`` are denoised in groups; when a later group fails, the
    earlier group's clip must not be left written (its stream would lose that clip)."""
    gen = make_generator("diffusion")
    a = gen.open(request_for(gen, steps=2))
    b = gen.open(request_for(gen, steps=3, seed=6))
    denoise = gen._denoise

    def fails_for_three_steps(streams, steps):
        if steps == 3:
            raise RuntimeError("out of memory (simulated)")
        return denoise(streams, steps)

    gen._denoise = fails_for_three_steps
    with pytest.raises(RuntimeError, match="simulated"):
        gen.step([a, b])
    assert (a.clip, b.clip) == (0, 0)
    assert gen.cache.length(a.slot) == gen.cache.length(b.slot) == 0
    gen._denoise = denoise
    (clip,) = gen.step([a])  # goes on as if the failed step never happened
    fresh = make_generator("diffusion")
    (expected,) = fresh.step([fresh.open(request_for(fresh, steps=2))])
    assert torch.equal(clip.data, expected.data)


def test_a_token_step_whose_reencoding_fails_changes_no_stream():
    """A plain stream batched with a re-tokenising one: when the re-tokenising fails, the
    plain stream's clip must not be left in its cache (a retry would write it twice)."""
    gen = make_generator("tokens")
    plain = gen.open(request_for(gen, seed=1))
    again = gen.open(request_for(gen, seed=2, reencode=True))
    encode = gen.tokenizer.encode

    def fails(frames):
        raise RuntimeError("out of memory (simulated)")

    gen.tokenizer.encode = fails
    with pytest.raises(RuntimeError, match="simulated"):
        gen.step([plain, again])
    gen.tokenizer.encode = encode
    assert_a_retry_goes_on_as_if_nothing_failed(gen, plain, again)


def assert_a_retry_goes_on_as_if_nothing_failed(gen, plain, again) -> None:
    """After a failed step of a plain and a re-tokenising token stream: nothing written,
    and the next two steps make what a fresh generator makes (the second reads the first's
    K/V, so a clip committed twice or not at all shows)."""
    assert (plain.clip, again.clip) == (0, 0)
    assert gen.cache.length(plain.slot) == gen.cache.length(again.slot) == 0
    fresh = make_generator("tokens")
    twins = [
        fresh.open(request_for(fresh, seed=1)),
        fresh.open(request_for(fresh, seed=2, reencode=True)),
    ]
    for _ in range(2):
        retried, expected = gen.step([plain, again]), fresh.step(twins)
        assert all(torch.equal(a.data, b.data) for a, b in zip(retried, expected, strict=True))


def test_equal_requests_have_one_fingerprint_whatever_their_number_forms():
    """fps=8 and 8.0, temperature=1 and 1.0, guidance=2 and 2.0 were different sha256s, so a
    render could not resume under an equal request written another way."""
    pairs = [
        ({"fps": 8}, {"fps": 8.0}),
        ({"temperature": 1}, {}),
        ({"top_p": 1}, {}),
        ({"guidance": 2}, {"guidance": 2.0}),
        ({"contrast": 1}, {"contrast": 1.0}),
    ]
    for a, b in pairs:
        ra, rb = GenerationRequest(frames=8, **a), GenerationRequest(frames=8, **b)
        assert ra.fingerprint() == rb.fingerprint(), a
    # The canonical form of the defaults is the form they were always hashed in.
    plain = GenerationRequest(frames=8, guidance=2.0)
    assert plain.fingerprint() == plain.fingerprint(canonical=False)
    assert GenerationRequest(frames=8, fps=12.5).to_json()["fps"] == 12.5


def test_continuous_actions_have_one_fingerprint_whatever_their_number_forms():
    """The model reads continuous actions as float32: ints, float64 and float32 of the same
    values made the same frames under three sha256s, so a render folder would not resume
    under the same actions written another way."""
    from vidgen.generators.base import request_fingerprints

    ints = np.array([[1, 0], [0, -2], [3, 1], [0, 0]] * 2)
    forms = [ints, ints.astype(np.float64), ints.astype(np.float32), ints.tolist()]
    prints = {GenerationRequest(frames=8, actions=a).fingerprint() for a in forms}
    assert len(prints) == 1
    tenth = np.full((8, 2), 0.1)
    assert (
        GenerationRequest(frames=8, actions=tenth).fingerprint()
        == GenerationRequest(frames=8, actions=tenth.astype(np.float32)).fingerprint()
    )
    assert (
        GenerationRequest(frames=8, actions=tenth).fingerprint()
        != GenerationRequest(frames=8, actions=tenth * 2).fingerprint()
    )
    hist = dict(context=np.zeros((8, 64, 64, 3), np.uint8))
    a = GenerationRequest(frames=8, actions=ints, context_action=[1, 2], **hist)
    b = GenerationRequest(frames=8, actions=ints, context_action=[1.0, 2.0], **hist)
    assert a.fingerprint() == b.fingerprint()
    # A folder recorded with int actions (their canonical form until 2026-12-03) resumes
    # under the same ints: the as-given form is among those accepted.
    old = GenerationRequest(frames=8, actions=ints).fingerprint(canonical=False)
    assert old in request_fingerprints(GenerationRequest(frames=8, actions=ints))
    # Discrete actions (ints, 1-D) are hashed as they always were.
    discrete = GenerationRequest(frames=8, actions=np.arange(8) % 3)
    assert discrete.fingerprint() == discrete.fingerprint(canonical=False)


def test_a_stream_given_twice_closed_or_from_another_generator_is_refused(family):
    gen = make_generator(family)
    stream = gen.open(request_for(gen))
    before = gen.snapshot(stream).cache
    with pytest.raises(ValueError, match="given twice"):
        gen.step([stream, stream])  # wrote two clips into one stream and skipped one
    after = gen.snapshot(stream)
    assert stream.clip == 0 and after.checkpoint_clip == 0
    for name in before:
        assert torch.equal(before[name], after.cache[name]), name
    other = make_generator(family)
    stranger = other.open(request_for(other, seed=9))
    assert stranger.id == stream.id  # same id, another generator's stream
    with pytest.raises(KeyError, match="not open on this generator"):
        gen.step([stranger])
    gen.close(stream)
    with pytest.raises(KeyError, match="not open on this generator"):
        gen.snapshot(stream)  # was: another stream's cache, or a bare KeyError


@pytest.mark.parametrize(("after", "pending"), [(0, 0), (2, 1), (4, 0), (3, 2)])
def test_restore_after_any_clip_continues_bit_identically_frames_too(family, after, pending):
    """DESIGN.md section 4, item 5, "after any clip": checkpoints taken after the window has
    filled and clips were evicted (the test window is 2 clips), with clips pending after
    them; the decoded frames agree too (a context decoder's state is restored)."""
    gen = make_generator(family)
    req = request_for(gen)
    stream = gen.open(req)
    whole = [gen.step([stream])[0] for _ in range(6)]
    gen.close(stream)
    stream = gen.open(req)
    for _ in range(after + 1):
        gen.step([stream])
    snap = gen.snapshot(stream)
    for _ in range(pending):
        snap.add(gen.step([stream])[0])
    gen.close(stream)
    other = make_generator(family)
    restored = other.restore(snap)
    rest = []
    while not restored.done:
        rest.append(other.step([restored])[0])
    made = after + 1 + pending
    assert [c.clip for c in rest] == list(range(made, 6))
    for new, old in zip(rest, whole[made:], strict=True):
        assert torch.equal(new.data, old.data)
        (a,), (b,) = other.decode([new]), gen.decode([old])
        np.testing.assert_array_equal(a.frames, b.frames)


def _tensor_bytes(root: object) -> int:
    """Bytes of the distinct tensors (and numpy arrays) reachable from ``root`` through any
    container the garbage collector can see into (attributes, ``__slots__``, dicts, lists,
    deques, ...; module parameters included: they are constant). Classes, modules and
    functions' globals are shared state, not the generator's: not followed."""
    seen, total, todo = set(), 0, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.untyped_storage().nbytes()
        elif isinstance(obj, np.ndarray):
            total += obj.nbytes
        elif isinstance(obj, type | types.ModuleType):
            continue
        elif isinstance(obj, types.FunctionType):  # a closure's cells, not its globals
            todo += list(obj.__closure__ or ())
        else:
            todo += gc.get_referents(obj)
    return total


def test_a_streams_memory_does_not_grow_with_its_length(family):
    """O(window) per stream, not only in the KV cache: everything the generator holds
    (stream state, the previous clip's tokens, RNG states, ...) is the same after 4 clips as
    after 14."""
    gen = make_generator(family, max_streams=1)
    stream = gen.open(request_for(gen, frames=16 * gen.clip_len, guidance=1.0))
    sizes = {}
    for made in range(1, 15):
        gen.step([stream])
        if made in (4, 14):
            sizes[made] = _tensor_bytes(gen)
    assert sizes[4] == sizes[14] > 0


def spy_encode(gen, encoder) -> list[tuple[int, ...]]:
    """The shapes ``encoder.encode`` is called with from now on."""
    shapes, real = [], encoder.encode
    encoder.encode = lambda video: shapes.append(tuple(video.shape)) or real(video)
    return shapes


def five_clips_of_context(gen) -> np.ndarray:
    h, w, _ = gen.frame_shape
    return np.random.default_rng(0).integers(0, 255, (5 * gen.clip_len, h, w, 3), np.uint8)


def test_a_long_context_is_encoded_clip_by_clip():
    """The diffusion family encoded the whole context video in one call: memory grew with
    the context's length (float frames and activations of every frame at once)."""
    gen = make_generator("diffusion")
    shapes = spy_encode(gen, gen.autoencoder)
    gen.open(request_for(gen, context=five_clips_of_context(gen)))
    assert len(shapes) == 5 and all(s[1] == gen.clip_len for s in shapes)


def test_a_generator_refuses_another_models_request_and_latents_of_another_shape(tmp_path):
    """In process, a request for another model ran on whatever generator it was given, its
    fingerprint naming the other model; latents of another shape decoded into frames of
    another size."""
    from tests.models import save_test_generators
    from vidgen.generators import ClipLatents, load_generator

    paths = save_test_generators(tmp_path)
    gen = load_generator(paths["diffusion"], max_streams=1)
    with pytest.raises(ValueError, match="this generator is"):
        gen.open(request_for(gen, model=paths["tokens"]))
    stream = gen.open(request_for(gen, model=paths["diffusion"]))
    (clip,) = gen.step([stream])
    with pytest.raises(ValueError, match="latents must be"):
        gen.decode([ClipLatents(stream=clip.stream, clip=clip.clip, data=clip.data[..., :2])])
    tokens = load_generator(paths["tokens"], max_streams=1)
    with pytest.raises(ValueError, match="video must be"):  # frames, not the latents' shape
        tokens.tokenizer.encode(torch.zeros(1, tokens.clip_len, 3, 16, 16))
    with pytest.raises(ValueError, match="ids must be integer"):
        tokens.tokenizer.decode(torch.zeros(1, tokens.config.tokens_per_clip))


def test_a_step_whose_write_fails_changes_no_stream():
    """Groups of different ``steps`` were written one after another: a failure in the
    second group's write pass left the first group's clip in its cache, its counter moved
    on and its clip never returned (lost)."""
    gen = make_generator("diffusion")
    a = gen.open(request_for(gen, steps=2))
    b = gen.open(request_for(gen, steps=3, seed=6))
    write, calls = gen.model.write, []

    def fails_for_b(latents, cache, slots, **kwargs):
        calls.append(list(slots))
        if b.slot in slots:
            raise RuntimeError("out of memory (simulated)")
        return write(latents, cache, slots, **kwargs)

    gen.model.write = fails_for_b
    with pytest.raises(RuntimeError, match="simulated"):
        gen.step([a, b])
    assert (a.clip, b.clip) == (0, 0)
    assert gen.cache.length(a.slot) == gen.cache.length(b.slot) == 0
    gen.model.write = write
    clips = gen.step([a, b])
    assert [c.clip for c in clips] == [0, 0]


def test_a_token_step_whose_replay_fails_changes_no_stream():
    """A plain stream batched with a re-tokenising one: the plain clip's K/V were committed
    before the re-tokenised clip's replay; when the replay failed, a retry wrote the plain
    stream's clip 0 twice."""
    gen = make_generator("tokens")
    plain = gen.open(request_for(gen, seed=1))
    again = gen.open(request_for(gen, seed=2, reencode=True))
    replay = gen._replay_partial

    def fails(*args):
        raise RuntimeError("out of memory (simulated)")

    gen._replay_partial = fails
    with pytest.raises(RuntimeError, match="simulated"):
        gen.step([plain, again])
    gen._replay_partial = replay
    assert_a_retry_goes_on_as_if_nothing_failed(gen, plain, again)


def test_closing_another_generators_stream_frees_nothing_here(family):
    """close() matched by id: another generator's handle with the same id closed this
    generator's stream (diffusion: freed the slot named by the foreign handle, so the next
    open shared a live stream's cache)."""
    gen, other = make_generator(family), make_generator(family)
    mine = [gen.open(request_for(gen, seed=s)) for s in (1, 2)]
    foreign = [other.open(request_for(other, seed=s)) for s in (3, 4, 5)]
    assert foreign[0].id == mine[0].id
    before = {s.id: gen.snapshot(s) for s in mine}
    gen.close(foreign[0])
    gen.close(foreign[2])  # an id this generator never gave out
    for s in mine:
        gen.step([s])  # still open, on their own slots
    fresh = gen.open(request_for(gen, seed=7))
    assert fresh.slot not in {s.slot for s in mine}
    for s in mine:
        assert gen.snapshot(s).checkpoint_clip == before[s.id].checkpoint_clip + 1


def test_a_snapshot_that_does_not_fit_its_request_is_refused(family):
    """restore trusted the snapshot's clip counter: a counter behind its cache, negative,
    past the request's end, or set without a cache made clips with other clips' seeds."""
    gen = make_generator(family)
    stream = gen.open(request_for(gen, frames=4 * gen.clip_len))
    gen.step([stream])
    first = gen.snapshot(stream)
    gen.step([stream])
    snap = gen.snapshot(stream)
    (made,) = gen.step([stream])
    good = dataclasses.replace(snap, pending=[made.data])
    gen.restore(good)  # fits
    # A NaN in the cache made black frames (diffusion) or failed the next step (tokens).
    k_name = next(n for n in snap.cache if n.split(".")[-1] == "k")
    nan_k = {**snap.cache, k_name: snap.cache[k_name].clone()}
    nan_k[k_name].view(-1)[0] = float("nan")
    bad = {
        "snapshot k holds values that are not finite": dataclasses.replace(snap, cache=nan_k),
        "checkpoint_clip must be >= 0, got -2": dataclasses.replace(snap, checkpoint_clip=-2),
        "does not match checkpoint_clip": dataclasses.replace(snap, checkpoint_clip=1),
        "without a cache": dataclasses.replace(snap, cache=None, pending=[made.data]),
        "its request makes 4": dataclasses.replace(snap, pending=[made.data] * 3),
        "pending clip 0": dataclasses.replace(snap, pending=[made.data[:1]]),
    }
    if gen.family == "tokens":
        bad["token ids must be"] = dataclasses.replace(snap, pending=[made.data + 10**6])
        prev = {**snap.cache, "prev": snap.cache["prev"][:1]}
        bad["'prev': token ids must be"] = dataclasses.replace(snap, cache=prev)
        # int16 ids passed the checks, then the embedding refused them in restore (pending)
        # or, worse, at the next step ('prev'), with torch's message naming no snapshot.
        bad["pending clip 0: token ids must be .* int64"] = dataclasses.replace(
            snap, pending=[made.data.to(torch.int16)]
        )
        short = {**snap.cache, "prev": snap.cache["prev"].to(torch.int16)}
        bad["'prev': token ids must be .* int64 .*torch.int16"] = dataclasses.replace(
            snap, cache=short
        )
        # The unconditional slot a clip behind the conditional one: read as the guided
        # step's context, other frames without a word.
        behind = {**snap.cache, **{n: t for n, t in first.cache.items() if "slot1." in n}}
        bad["slot1.next_frame differs from slot0's"] = dataclasses.replace(snap, cache=behind)
        bos = {**snap.cache, "prev": torch.full_like(snap.cache["prev"], -1)}
        bad["'prev' must be the last block written"] = dataclasses.replace(snap, cache=bos)
        # The previous clip's ids beside a cache holding none: taken without a word.
        fresh = gen.open(request_for(gen, frames=4 * gen.clip_len))
        opened = gen.snapshot(fresh)
        gen.close(fresh)
        early = {**opened.cache, "last": snap.cache["last"]}
        bad["'last' must be absent"] = dataclasses.replace(opened, cache=early)
        if gen.tokenizer.config.context_decoder:
            # Without them the next clip was decoded with no context: other frames.
            lost = {k: v for k, v in snap.cache.items() if k != "last"}
            bad["has no 'last'"] = dataclasses.replace(snap, cache=lost)
    else:
        # The message says what failed: it named the shape alone, the expected one.
        bad["finite floats .* got torch.float32 .* with non-finite values"] = dataclasses.replace(
            snap, pending=[made.data * float("nan")]
        )
        bad["finite floats .* got torch.int64"] = dataclasses.replace(
            snap, pending=[made.data.long()]
        )
    open_before = len(gen._streams)
    for message, snapshot in bad.items():
        with pytest.raises(ValueError, match=message):
            gen.restore(snapshot)
    assert len(gen._streams) == open_before  # nothing left open by a refusal


def test_emitted_clips_own_their_memory(family):
    """Clips were views into the batch's tensor: each held (and pickled, and kept in the
    orchestrator's truth) the whole batch, and a change to one reached the stream's state."""
    gen = make_generator(family)
    streams = [gen.open(request_for(gen, seed=s)) for s in range(3)]
    clips = gen.step(streams)
    for c in clips:
        assert c.data.untyped_storage().nbytes() == c.data.nbytes
    if gen.family == "tokens":
        expected = gen.step([streams[0]])[0].data.clone()
        # A caller's in-place change to an emitted clip must not reach the stream.
        other = make_generator(family)
        twin = [other.open(request_for(other, seed=s)) for s in range(3)]
        for c in other.step(twin):
            c.data.zero_()
        assert torch.equal(other.step([twin[0]])[0].data, expected)


def test_a_token_models_long_context_is_converted_clip_by_clip():
    """The token family converted the whole context to float frames on the device at once
    (4x its uint8 size, growing with the context's length)."""
    import vidgen.generators.tokens as tokens_module

    gen = make_generator("tokens")
    shapes = spy_encode(gen, gen.tokenizer)
    converted = []
    to_model = tokens_module.to_model_range
    tokens_module.to_model_range = lambda x: converted.append(len(x)) or to_model(x)
    try:
        gen.open(request_for(gen, context=five_clips_of_context(gen)))
    finally:
        tokens_module.to_model_range = to_model
    assert len(shapes) == 5 and converted == [gen.clip_len] * 5


def continuous_diffusion():
    autoencoder = randomize_(KLAutoencoder(KL_CONFIGS["test"]), seed=2, std=0.1)
    cfg = dataclasses.replace(CA2VDM_CONFIGS["test"], num_actions=0, action_dim=2)
    return DiffusionClipGenerator(randomize_(CausalVideoDiT(cfg), seed=1), autoencoder)


def test_continuous_actions_past_max_action_are_refused_by_name():
    """1e15 passed every check and made an all-black video (float32 activations overflowed
    to NaN); token models failed mid-step without naming the actions."""
    gen = continuous_diffusion()
    frames = gen.clip_len
    ok = np.full((frames, 2), 3.0)
    gen.close(gen.open(request_for(gen, frames=frames, label=None, actions=ok)))
    # The most negative int64 too: np.abs leaves it negative, and it passed as small.
    for big in (1e15, -2e4, np.iinfo(np.int64).min):
        with pytest.raises(ValueError, match=r"actions must be within \+-10000"):
            gen.open(request_for(gen, frames=frames, label=None, actions=np.full((frames, 2), big)))
    context = np.zeros((frames, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"context_action must be within"):
        gen.open(
            request_for(
                gen, frames=frames, label=None, actions=ok, context=context, context_action=[1e9, 0]
            )
        )


def test_long_double_actions_are_taken_as_float64():
    """np.longdouble passed every check and failed at the first step (torch has no such
    dtype), naming neither the request nor its actions."""
    gen = continuous_diffusion()
    frames = gen.clip_len
    wide = np.linspace(-2, 2, frames * 2).reshape(frames, 2).astype(np.longdouble)
    request = request_for(gen, frames=frames, label=None, actions=wide)
    assert request.actions.dtype == np.float64
    narrow = request_for(gen, frames=frames, label=None, actions=wide.astype(np.float64))
    assert request.fingerprint() == narrow.fingerprint()
    a, b = gen.open(request), gen.open(narrow)
    first, second = gen.step([a, b])
    torch.testing.assert_close(first.data, second.data, rtol=0, atol=1e-5)


def test_big_endian_actions_give_the_same_video(family):
    """A big-endian array (a .npy from another machine) passed every check, then torch
    refused it mid-step (the stream left open, the error not naming actions)."""
    gen = make_generator(family)
    frames = 2 * gen.clip_len
    acts = np.random.default_rng(2).integers(0, 5, frames)
    native = clips_of(gen, request_for(gen, frames=frames, actions=acts))
    swapped = acts.astype(acts.dtype.newbyteorder(">"))
    assert not swapped.dtype.isnative
    req = request_for(gen, frames=frames, actions=swapped)
    assert req.actions.dtype.isnative
    assert torch.equal(clips_of(gen, req), native)


def test_guidance_leaves_a_stream_with_nothing_to_guide_alone():
    """The diffusion family guided every stream of a conditioned model: a request without a
    label or actions had its conditional pass read the zero velocity of "no actions" against
    the null action, so guidance changed a video that asked for no condition at all."""
    gen = continuous_diffusion()
    runs = [
        clips_of(gen, request_for(gen, frames=gen.clip_len, label=None, guidance=g))
        for g in (1.0, 3.0)
    ]
    assert torch.equal(*runs)
    acts = np.full((gen.clip_len, 2), 2.0)
    guided = [
        clips_of(gen, request_for(gen, frames=gen.clip_len, label=None, actions=acts, guidance=g))
        for g in (1.0, 3.0)
    ]
    assert (guided[0] - guided[1]).abs().max() > 1e-3


def test_a_request_keeps_its_own_actions():
    """The request held the caller's array: an agent loop reusing its action buffer changed
    a running stream's actions (and its fingerprint) under it."""
    buffer = np.zeros(8, dtype=np.int64)
    req = GenerationRequest(frames=8, actions=buffer, context_action=np.int64(1))
    before = req.fingerprint()
    buffer[:] = 3
    assert req.actions.tolist() == [0] * 8 and req.fingerprint() == before
    with pytest.raises(ValueError, match="read-only"):
        req.actions[0] = 1


def test_check_generator_reads_each_checkpoint_header_once(tmp_path, monkeypatch):
    """It runs on every item of a manifest before anything renders: the model's header was
    read twice (its config type, then its card)."""
    from pathlib import Path

    from tests.models import save_test_generators
    from vidgen import checkpoint
    from vidgen.generators import check_generator

    paths = save_test_generators(tmp_path)
    opened: list[str] = []
    real_open = checkpoint.safe_open

    def safe_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", safe_open)
    check_generator(paths["tokens"], reencode=True)
    assert opened == ["nbp-test.safetensors", "larp-test.safetensors", "kl-test.safetensors"]
    opened.clear()
    check_generator(paths["diffusion"], contrast=1.2)
    assert opened == ["ca2vdm-test.safetensors", "kl-test.safetensors"]


def test_check_generator_names_what_is_wrong(tmp_path):
    from tests.models import save_test_generators
    from vidgen import checkpoint
    from vidgen.generators import check_generator

    paths = save_test_generators(tmp_path)
    kl = str(tmp_path / "kl-test.safetensors")
    with pytest.raises(ValueError, match="is a KLConfig checkpoint, not a generator; shipped "):
        check_generator(kl)
    with pytest.raises(ValueError, match="reencode applies to token models only; .* diffusion"):
        check_generator(paths["diffusion"], reencode=True)
    with pytest.raises(ValueError, match="contrast applies to diffusion models only; .* token"):
        check_generator(paths["tokens"], contrast=1.2)
    missing = str(tmp_path / "gone.safetensors")
    checkpoint.update_card(paths["diffusion"], {"tokenizer": missing})
    with pytest.raises(ValueError, match="the tokenizer it names .*gone.* is not usable"):
        check_generator(paths["diffusion"])
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        check_generator(str(tmp_path / "nothing.safetensors"))


def test_a_stream_keeps_its_own_checked_copy_of_the_request(family):
    """A caller that changes its request object after ``open`` changes neither the running
    stream nor its snapshot; a field set after construction (which skips the checks) is
    checked when the stream opens."""
    gen = make_generator(family)
    whole = clips_of(gen, request_for(gen))
    req = request_for(gen)
    stream = gen.open(req)
    (first,) = gen.step([stream])
    req.seed, req.label = 99, 1
    rest = [first.data]
    while not stream.done:
        (clip,) = gen.step([stream])
        rest.append(clip.data)
    assert torch.equal(torch.stack(rest), whole)
    assert stream.request is not req and stream.request.seed == 5
    gen.close(stream)
    bad = request_for(gen)
    bad.guidance = float("nan")
    with pytest.raises(ValueError, match="guidance must be finite"):
        gen.open(bad)
    # Checked as the stream will hold it, in both families: a list of actions set after
    # construction reached the token family's checks unconverted (AttributeError).
    late = request_for(gen, label=None)
    late.actions = [1] * late.frames
    gen.close(gen.open(late))
    with pytest.raises(ValueError, match="request must be a GenerationRequest"):
        gen.restore(StreamSnapshot.start({"frames": 8}))


def test_a_stream_keeps_its_own_context(family):
    """The request held the caller's context array: a caller reusing that buffer after
    ``open`` changed the stream's snapshots (their fingerprint and a restore from the
    start), where its actions were already copied."""
    gen = make_generator(family)
    buffer = five_clips_of_context(gen)[: 2 * gen.clip_len].copy()
    req = request_for(gen, context=buffer)
    whole = clips_of(gen, req)
    stream = gen.open(req)
    start = gen.snapshot(stream)
    buffer[:] = 0
    assert start.request.fingerprint() == req.fingerprint()
    assert torch.equal(clips_of_stream(gen, gen.restore(start)), whole)
    gen.close(stream)


def test_a_diffusion_generator_refuses_a_bad_time_shift():
    gen = make_generator("diffusion")
    with pytest.raises(ValueError, match="time_shift"):
        type(gen)(gen.model, gen.autoencoder, time_shift=0)


def test_the_sde_sampler_batches_restores_and_comes_from_the_card(tmp_path):
    """With ``eta`` > 0 each Euler step adds noise drawn per stream from (seed, clip): streams
    of different ages batched equal their single runs, a restore replays bit-identically,
    and eta changes the clips."""
    gen = make_generator("diffusion")
    L = gen.clip_len
    ode = clips_of(gen, request_for(gen, seed=1, frames=3 * L))
    gen.eta = 0.5
    reqs = [request_for(gen, seed=s, frames=3 * L, guidance=g) for s, g in ((1, 2.0), (2, 1.0))]
    singles = [clips_of(gen, r) for r in reqs]
    assert not torch.allclose(singles[0], ode, atol=1e-3)
    for got, single in zip(batched_clips(gen, reqs, stagger=True), singles, strict=True):
        torch.testing.assert_close(got, single, atol=1e-5, rtol=0)  # stream 1 joins late
    stream = gen.open(reqs[0])
    gen.step([stream])
    snap = gen.snapshot(stream)
    gen.close(stream)
    restored = gen.restore(snap)
    rest = [gen.step([restored])[0].data for _ in range(2)]
    assert torch.equal(torch.stack(rest), singles[0][1:])
    for bad, message in [(-0.1, r"eta must be in \[0, 10"), (float("nan"), "eta must be finite")]:
        with pytest.raises(ValueError, match=message):
            type(gen)(gen.model, gen.autoencoder, eta=bad)

    from tests.models import save_test_generators
    from vidgen import checkpoint
    from vidgen.generators import load_generator

    path = save_test_generators(tmp_path)["diffusion"]
    assert load_generator(path).eta == 0.0  # a card without one: the ODE sampler
    checkpoint.update_card(path, {"eta": 0.25})
    assert load_generator(path).eta == 0.25
    checkpoint.update_card(path, {"eta": 11})
    with pytest.raises(ValueError, match=r"eta must be in \[0, 10"):
        load_generator(path)


def test_a_snapshots_request_and_a_decoded_clips_frames_are_their_own(family):
    """A snapshot handed back the running stream's own request (a caller branching the video
    from it with another label changed the stream too, unchecked); decoded clips were views
    of one batch array (one clip held kept every clip's frames alive)."""
    gen = make_generator(family)
    frames = 3 * gen.clip_len
    stream = gen.open(request_for(gen, frames=frames))
    gen.step([stream])
    snap = gen.snapshot(stream)
    assert snap.request is not stream.request and snap.request == stream.request
    snap.request.label = 4
    assert stream.request.label == 2
    other = gen.open(request_for(gen, frames=frames, seed=9))
    clips = gen.decode(gen.step([stream, other]))
    assert all(c.frames.base is None and c.frames.flags.owndata for c in clips)
    gen.close(stream)
    gen.close(other)


def test_a_failed_commit_of_a_step_with_reencode_changes_no_stream(monkeypatch):
    """A step with re-tokenised and sampled streams committed their K/V in two writes: when
    the second failed (out of memory, say), the re-tokenised streams had a clip in their
    cache that their count did not have, and a retried step made other clips."""
    gen = make_generator("tokens")
    frames = 3 * gen.clip_len
    requests = [request_for(gen, frames=frames, reencode=True), request_for(gen, frames=frames)]
    expected = batched_clips(gen, requests)
    streams = [gen.open(r) for r in requests]
    made = [[c.data] for c in gen.step(streams)]
    plain_slots = set(gen._rows[streams[1].id].slots)
    real = type(gen.model).commit
    before = [gen.cache.next_frame(s) for r in streams for s in gen._rows[r.id].slots]

    def failing(self, partial, cache, slots):
        if plain_slots & set(slots):
            raise RuntimeError("out of memory (simulated)")
        return real(self, partial, cache, slots)

    monkeypatch.setattr(type(gen.model), "commit", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        gen.step(streams)
    assert [gen.cache.next_frame(s) for r in streams for s in gen._rows[r.id].slots] == before
    assert [s.clip for s in streams] == [1, 1]
    monkeypatch.setattr(type(gen.model), "commit", real)
    while not streams[0].done:
        for out, clip in zip(made, gen.step(streams), strict=True):
            out.append(clip.data)
    for got, want in zip(made, expected, strict=True):
        assert torch.equal(torch.stack(got), want)


def test_the_diffusion_write_pass_renoises_each_clip_from_its_stream_seed():
    """The finished clip enters the cache lightly re-noised (``prefix_t``) with noise drawn
    from (seed, clip), as training showed the model its context: a write without the noise
    passed every other test, which compare the generator with itself."""
    from vidgen.generators.base import seeded
    from vidgen.nn import KVCache

    gen = make_generator("diffusion", max_streams=1)
    req = request_for(gen, guidance=1.0)
    stream = gen.open(req)
    (clip,) = gen.step([stream])
    got = gen.cache.snapshot(stream.slot)["k"]
    acts = gen._actions([stream], [0])
    written = []
    for noise in (torch.randn(clip.data.shape, generator=seeded(req.seed, 0, "context")), None):
        fresh = KVCache(gen.model.cache_spec())
        slot = fresh.add_stream()
        gen.model.write(
            clip.data[None],
            fresh,
            [slot],
            actions=acts,
            noise=None if noise is None else noise[None],
        )
        written.append(fresh.snapshot(slot)["k"])
    torch.testing.assert_close(got, written[0], atol=1e-6, rtol=0)
    assert (got - written[1]).abs().max() > 1e-3


def test_a_label_for_a_model_without_labels_is_refused_as_such():
    """It said "label must be in [0, 0) or None", an empty range, not that the model takes
    no labels."""
    from vidgen.generators import DiffusionClipGenerator

    ae = randomize_(KLAutoencoder(KL_CONFIGS["test"]), seed=2, std=0.1)
    cfg = dataclasses.replace(CA2VDM_CONFIGS["test"], num_classes=0)
    gen = DiffusionClipGenerator(randomize_(CausalVideoDiT(cfg), seed=1), ae, max_streams=2)
    with pytest.raises(ValueError, match="label must be None: this model takes no labels"):
        gen.open(GenerationRequest(model="test", frames=cfg.clip_len, label=1))
    gen.close(gen.open(GenerationRequest(model="test", frames=cfg.clip_len, label=None)))


def test_a_token_models_top_k_past_its_vocabulary_is_refused():
    """top_k=1000 on a 64-code model kept every code: the frames of top_k=0, silently."""
    gen = make_generator("tokens")
    vocab = gen.config.vocab
    gen.close(gen.open(request_for(gen, top_k=vocab)))
    with pytest.raises(ValueError, match=f"top_k must be at most the model's {vocab} codes"):
        gen.open(request_for(gen, top_k=vocab + 1))

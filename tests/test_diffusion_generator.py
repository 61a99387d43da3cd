"""The clip-generator contract over the diffusion family (test sizes, random weights)."""

import numpy as np
import pytest
import torch

from vidgen.generators import (
    DiffusionClipGenerator,
    GenerationRequest,
    generate_video,
)
from vidgen.models.ca2vdm import CA2VDM_CONFIGS, CausalVideoDiT
from vidgen.nn import randomize_
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder

CFG = CA2VDM_CONFIGS["test"]
L = CFG.clip_len


def make_generator(max_streams: int = 4) -> DiffusionClipGenerator:
    model = randomize_(CausalVideoDiT(CFG), seed=1)
    autoencoder = randomize_(KLAutoencoder(KL_CONFIGS["test"]), seed=2, std=0.1)
    return DiffusionClipGenerator(model, autoencoder, max_streams=max_streams)


def request(**kwargs) -> GenerationRequest:
    base = dict(model="test", frames=6 * L, seed=5, label=2, steps=3, guidance=2.0)
    base.update(kwargs)
    return GenerationRequest(**base)


def latents_of(gen: DiffusionClipGenerator, req: GenerationRequest, clips: int | None = None):
    stream = gen.open(req)
    out = []
    while not stream.done and (clips is None or len(out) < clips):
        (clip,) = gen.step([stream])
        out.append(clip.data)
    gen.close(stream)
    return torch.stack(out)


def test_same_request_same_frames_and_nontrivial():
    gen = make_generator()
    a = [c.frames for c in generate_video(gen, request())]
    b = [c.frames for c in generate_video(gen, request())]
    assert len(a) == 6 and a[0].shape == (L, 32, 32, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert np.std(np.concatenate(a).astype(float)) > 1.0
    c = [c.frames for c in generate_video(gen, request(seed=6))]
    assert not np.array_equal(a[0], c[0])


def test_snapshot_restore_continues_bit_identically():
    gen = make_generator()
    whole = latents_of(gen, request())
    # Checkpoint after clip 1, two more clips made, then the stream is lost.
    stream = gen.open(request())
    gen.step([stream])
    snap = gen.snapshot(stream)
    for _ in range(2):
        (clip,) = gen.step([stream])
        snap.add(clip)
    gen.close(stream)
    other = make_generator()  # another actor with the same weights
    restored = other.restore(snap)
    assert restored.clip == 3
    rest = []
    while not restored.done:
        (clip,) = other.step([restored])
        rest.append(clip.data)
    assert torch.equal(torch.stack(rest), whole[3:])


def test_batched_streams_of_different_ages_equal_single_runs():
    gen = make_generator()
    reqs = [request(seed=s, label=s % 4, frames=4 * L) for s in (1, 2, 3)]
    singles = [latents_of(gen, r) for r in reqs]
    streams = [gen.open(r) for r in reqs]
    made: dict[int, list[torch.Tensor]] = {s.id: [] for s in streams}
    # Stream 0 starts alone, stream 1 joins after one clip, stream 2 after two.
    for i in range(6):
        active = [s for j, s in enumerate(streams) if j <= i and not s.done]
        if not active:
            break
        for clip in gen.step(active):
            made[clip.stream].append(clip.data)
    for s, single in zip(streams, singles, strict=True):
        torch.testing.assert_close(torch.stack(made[s.id]), single, atol=1e-5, rtol=1e-5)
        gen.close(s)


def test_context_and_actions_condition_the_video():
    gen = make_generator()
    rng = np.random.default_rng(0)
    context = rng.integers(0, 256, (2 * L, 32, 32, 3), dtype=np.uint8)
    plain = latents_of(gen, request(frames=2 * L))
    with_context = latents_of(gen, request(frames=2 * L, context=context))
    acts = rng.integers(0, CFG.num_actions, 2 * L)
    with_actions = latents_of(gen, request(frames=2 * L, actions=acts))
    assert (plain - with_context).abs().max() > 1e-3
    assert (plain - with_actions).abs().max() > 1e-3


def test_bad_requests_are_named():
    gen = make_generator(max_streams=1)
    with pytest.raises(ValueError, match=f"multiple of clip_len={L}"):
        gen.open(request(frames=L + 1))
    with pytest.raises(ValueError, match="label"):
        gen.open(request(label=9))
    with pytest.raises(ValueError, match="actions must be in"):
        gen.open(request(frames=L, actions=np.full(L, 7)))
    stream = gen.open(request())
    with pytest.raises(RuntimeError, match="stream slots"):
        gen.open(request())
    gen.close(stream)


def test_memory_is_bounded_by_the_window():
    gen = make_generator(max_streams=1)
    stream = gen.open(request(frames=12 * L))
    sizes = []
    while not stream.done:
        gen.step([stream])
        sizes.append(gen.cache.stream_nbytes(stream.slot))
    full = gen.cache.spec.bytes_per_frame * CFG.window
    assert sizes[CFG.window_clips - 1 :] == [full] * (12 - CFG.window_clips + 1)
    assert gen.cache.nbytes == gen.cache.spec.nbytes

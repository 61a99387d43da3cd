"""Ca2-VDM invariants (DESIGN.md section 4): cached == banded reference, causality, cache
sharing, conditioning. Test size, every weight random, 2 layers."""

import dataclasses
import hashlib

import pytest
import torch

from vidgen.models.ca2vdm import (
    CA2VDM_CONFIGS,
    CausalVideoDiT,
    Cond,
    history_mask,
    teacher_forcing_mask,
)
from vidgen.nn import KVCache, randomize_
from vidgen.train.diffusion import flow_matching_loss

CFG = CA2VDM_CONFIGS["test"]
L = CFG.clip_len


@pytest.fixture(scope="module")
def model() -> CausalVideoDiT:
    assert CFG.depth >= 2
    return randomize_(CausalVideoDiT(CFG), seed=1).eval()


def latents(frames: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, frames, CFG.latent_channels, CFG.latent_size, CFG.latent_size)
    return torch.randn(shape, generator=g)


def actions(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, CFG.num_actions, (1, frames), generator=torch.Generator().manual_seed(seed)
    )


def reference(model, history, acts, noisy, t, label):
    """The banded whole-history forward, sliced to the noisy clip."""
    ctx_frames = history.shape[1]
    x = torch.cat([history, noisy], dim=1)
    drop = torch.zeros(1, x.shape[1], dtype=torch.bool)
    drop[:, :ctx_frames] = True  # context frames carry the null label
    cond = Cond(
        t=torch.cat([torch.full((1, ctx_frames), CFG.prefix_t), torch.full((1, L), t)], dim=1),
        labels=torch.tensor([label]),
        actions=acts,
        drop_label=drop,
    )
    mask = history_mask(x.shape[1], L, CFG.window_clips)
    return model.forward_history(x, cond, mask)[:, ctx_frames:]


def run_equivalence(model, cache_cls=KVCache, clips=6) -> float:
    """Worst |cached - reference| over every denoising step of every clip."""
    hist, acts = latents(clips * L, seed=3), actions((clips + 1) * L, seed=4)
    cache = cache_cls(model.cache_spec())
    s = cache.add_stream()
    worst = 0.0
    with torch.no_grad():
        for k in range(clips):
            for step, t in enumerate((1.0, 0.6, 0.2)):
                noisy = latents(L, seed=100 * k + step)
                cond = Cond(
                    t=torch.full((1, L), t),
                    labels=torch.tensor([2]),
                    actions=acts[:, k * L : (k + 1) * L],
                )
                out = model(noisy, cond, cache, [s])
                assert out.std() > 0.1  # non-trivial before comparing
                ref = reference(model, hist[:, : k * L], acts[:, : (k + 1) * L], noisy, t, 2)
                worst = max(worst, (out - ref).abs().max().item())
                if k and step == 0:  # the context is read at all: another history differs
                    other = latents(k * L, seed=77 + k)
                    alt = reference(model, other, acts[:, : (k + 1) * L], noisy, t, 2)
                    assert (out - alt).abs().max().item() > 1e-3
            model.write(
                hist[:, k * L : (k + 1) * L], cache, [s], actions=acts[:, k * L : (k + 1) * L]
            )
    return worst


def test_cached_equals_banded_reference_across_evictions(model):
    # 6 clips with a window of 2: four evictions; every denoising step compared.
    assert run_equivalence(model) < 1e-5


class OffByOne(KVCache):
    """A broken cache: the new clip's positions are one frame late."""

    def query_positions(self, streams, num_frames):
        return super().query_positions(streams, num_frames) + 1


def test_a_position_off_by_one_is_caught(model):
    assert run_equivalence(model, OffByOne, clips=3) > 1e-3


def test_causality_in_the_history_forward(model):
    x = latents(4 * L, seed=5)
    cond = Cond(
        t=torch.rand(1, 4 * L, generator=torch.Generator().manual_seed(0)),
        labels=torch.tensor([1]),
        actions=actions(4 * L),
    )
    mask = history_mask(4 * L, L, CFG.window_clips)
    with torch.no_grad():
        base = model.forward_history(x, cond, mask)
        for j in (1, L + 1, 3 * L):
            changed = x.clone()
            changed[:, j] += 1.0
            out = model.forward_history(changed, cond, mask)
            assert torch.equal(out[:, :j], base[:, :j]), j
            assert (out[:, j:] - base[:, j:]).abs().max() > 1e-3


def digest(cache: KVCache) -> str:
    return hashlib.sha256(cache.k.numpy().tobytes() + cache.v.numpy().tobytes()).hexdigest()


def test_cache_does_not_depend_on_the_noisy_clip(model):
    cache = KVCache(model.cache_spec())
    s = cache.add_stream()
    hist = latents(2 * L, seed=6)
    with torch.no_grad():
        model.write(hist[:, :L], cache, [s])
        before = digest(cache)
        for t in (0.9, 0.1):  # denoising steps read, never write
            model(
                latents(L, seed=7),
                Cond(t=torch.full((1, L), t), labels=torch.tensor([1])),
                cache,
                [s],
            )
        assert digest(cache) == before
        model.write(hist[:, L:], cache, [s])
        after_a = digest(cache)
    fresh = KVCache(model.cache_spec())
    s2 = fresh.add_stream()
    with torch.no_grad():
        model.write(hist[:, :L], fresh, [s2])
        model.write(hist[:, L:], fresh, [s2])  # no noisy forwards in between
    assert digest(fresh) == after_a


def test_label_and_actions_change_the_output_and_null_enables_guidance(model):
    x = latents(L, seed=8)
    t = torch.full((1, L), 0.5)
    with torch.no_grad():
        base = model(x, Cond(t=t, labels=torch.tensor([1]), actions=actions(L)))
        other_label = model(x, Cond(t=t, labels=torch.tensor([3]), actions=actions(L)))
        other_actions = model(x, Cond(t=t, labels=torch.tensor([1]), actions=actions(L, seed=9)))
        null = model(
            x,
            Cond(
                t=t,
                labels=torch.tensor([1]),
                actions=actions(L),
                drop_label=torch.tensor([True]),
                drop_actions=torch.tensor([True]),
            ),
        )
    for out in (other_label, other_actions, null):
        assert (out - base).abs().max() > 1e-3


def test_teacher_forcing_mask_matches_inference_structure():
    m = teacher_forcing_mask(3, 2, window_clips=1)
    t = 6
    assert torch.equal(m[:t, :t], history_mask(t, 2, 1))
    assert not m[:t, t:].any()  # clean frames never see noisy ones
    # Noisy clip 2 (rows 10, 11) sees clean clip 1 (frames 2, 3) and itself causally.
    assert m[10].nonzero().flatten().tolist() == [2, 3, 10]
    assert m[11].nonzero().flatten().tolist() == [2, 3, 10, 11]


def test_conformance_shapes_determinism_backward():
    model = randomize_(CausalVideoDiT(CFG), seed=2)
    x = latents(2 * L, seed=1, batch=2)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = flow_matching_loss(model, x, g1, labels=torch.tensor([1, 2]))["loss"]
    b = flow_matching_loss(model, x, g2, labels=torch.tensor([1, 2]))["loss"]
    assert torch.equal(a, b)
    a.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert not CausalVideoDiT(CFG)(x[:, :L], Cond(t=torch.full((2, L), 0.5))).any()  # zero-init


def test_a_test_model_overfits_one_clip():
    torch.manual_seed(0)
    model = CausalVideoDiT(CFG)
    clip = latents(2 * L, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(250):
        loss = flow_matching_loss(model, clip, gen, labels=torch.tensor([2]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)


def test_training_forward_equals_inference_for_every_prefix_length(model):
    """The teacher-forcing forward of flow_matching_loss (all prefix lengths at once) gives
    each noisy clip exactly the prediction that cached inference gives it after the write
    passes of the clips before it (same context noise), across an eviction."""
    from vidgen.sampling.flow import add_noise

    clips = CFG.window_clips + 2
    total = clips * L
    x = latents(total, seed=3)
    g = torch.Generator().manual_seed(4)
    context_noise, noise = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    context = add_noise(x, context_noise, torch.full((1,), CFG.prefix_t))
    t = torch.rand(1, clips, generator=g).repeat_interleave(L, dim=1)
    noisy = add_noise(x, noise, t)
    acts = actions(total, seed=5)
    clean = torch.ones(1, total, dtype=torch.bool)
    cond = Cond(
        t=torch.cat([torch.full((1, total), CFG.prefix_t), t], dim=1),
        labels=torch.tensor([3]),
        actions=torch.cat([acts, acts], dim=1),
        drop_label=torch.cat([clean, ~clean], dim=1),
        drop_actions=torch.cat([~clean, ~clean], dim=1),
    )
    mask = teacher_forcing_mask(clips, L, CFG.window_clips)
    positions = torch.arange(total).repeat(2)[None]
    with torch.no_grad():
        trained = model.forward_history(torch.cat([context, noisy], 1), cond, mask, positions)
        cache = KVCache(model.cache_spec())
        s = cache.add_stream()
        for k in range(clips):
            part = slice(k * L, (k + 1) * L)
            step_cond = Cond(t=t[:, part], labels=torch.tensor([3]), actions=acts[:, part])
            out = model(noisy[:, part], step_cond, cache, [s])
            assert out.std() > 0.1
            torch.testing.assert_close(out, trained[:, total:][:, part], atol=1e-5, rtol=0)
            model.write(x[:, part], cache, [s], actions=acts[:, part], noise=context_noise[:, part])


def test_context_noise_max_noises_each_context_clip_at_its_own_recorded_level(monkeypatch):
    """Training against drift: each context clip is noised at its own level in
    [prefix_t, context_noise_max], and that level is the clip's timestep; off, every context
    frame has prefix_t and the loss draws exactly what it drew before the option existed."""
    import dataclasses

    from vidgen.sampling.flow import add_noise

    seen = []
    original = CausalVideoDiT.forward_history

    def spy(self, x, cond, mask, positions):
        seen.append((x.detach(), cond.t.detach()))
        return original(self, x, cond, mask, positions)

    monkeypatch.setattr(CausalVideoDiT, "forward_history", spy)
    clips, total = 4, 4 * L
    x = latents(total, seed=6, batch=3)
    off = randomize_(CausalVideoDiT(CFG), seed=2)
    on_cfg = dataclasses.replace(CFG, context_noise_max=0.5)
    on = randomize_(CausalVideoDiT(on_cfg), seed=2)
    flow_matching_loss(off, x, torch.Generator().manual_seed(0), labels=torch.tensor([1, 2, 3]))
    flow_matching_loss(on, x, torch.Generator().manual_seed(0), labels=torch.tensor([1, 2, 3]))
    (x_off, t_off), (x_on, t_on) = seen
    assert torch.equal(t_off[:, :total], torch.full((3, total), CFG.prefix_t))
    # Off: the context is x noised at prefix_t with the generator's first normal draw.
    g = torch.Generator().manual_seed(0)
    expected = add_noise(x, torch.randn(x.shape, generator=g), torch.full((3,), CFG.prefix_t))
    torch.testing.assert_close(x_off[:, :total], expected)
    levels = t_on[:, :total].reshape(3, clips, L)
    assert torch.equal(levels, levels[..., :1].expand_as(levels))  # one level per clip
    levels = levels[..., 0]
    assert (levels >= CFG.prefix_t).all() and (levels <= 0.5).all()
    assert levels.std() > 0.05  # levels differ between clips and samples
    # The context's distance from the clean latents grows with its level.
    per_clip = (x_on[:, :total] - x).reshape(3, clips, -1)
    dist = per_clip.norm(dim=-1) / x.reshape(3, clips, -1).norm(dim=-1)
    order = levels.flatten().argsort()
    assert dist.flatten()[order[-1]] > dist.flatten()[order[0]] * 2


def test_context_recycle_puts_the_models_own_estimate_in_the_context(monkeypatch):
    """Error recycling: a no-grad teacher-forced pass over noisy copies (one flow time per
    clip in [0, context_recycle_t]) gives the model's one-step estimate of every clip,
    x_t - t v; picked context clips are replaced by it (then noised at prefix_t as usual),
    the targets stay the real clips; held-out evaluation never recycles."""
    import dataclasses

    from vidgen.sampling.flow import add_noise, velocity_target

    calls = []
    original = CausalVideoDiT.forward_history

    def spy(self, x, cond, mask, positions):
        out = original(self, x, cond, mask, positions)
        calls.append((x.detach(), cond.t.detach(), out.detach(), torch.is_grad_enabled()))
        return out

    monkeypatch.setattr(CausalVideoDiT, "forward_history", spy)
    clips, total = 4, 4 * L
    x = latents(total, seed=7, batch=2)
    labels = torch.tensor([1, 2])
    cfg = dataclasses.replace(CFG, context_recycle=1.0, context_recycle_t=0.4)
    model = randomize_(CausalVideoDiT(cfg), seed=3)
    loss = flow_matching_loss(model, x, torch.Generator().manual_seed(0), labels=labels)
    (x_r, t_r, v_r, grad_r), (x_tr, t_tr, v_tr, grad_tr) = calls
    assert not grad_r and grad_tr
    g = torch.Generator().manual_seed(0)
    real_context = add_noise(x, torch.randn(x.shape, generator=g), torch.full((2,), CFG.prefix_t))
    torch.testing.assert_close(x_r[:, :total], real_context)  # the estimate sees real history
    levels = t_r[:, total:].reshape(2, clips, L)
    assert torch.equal(levels, levels[..., :1].expand_as(levels))
    assert (levels >= 0).all() and (levels <= 0.4).all() and levels.std() > 0.02
    t = t_r[:, total:, None, None, None]
    own = x_r[:, total:] - t * v_r[:, total:]
    assert (own - x).abs().mean() > 0.05  # a random model's estimate is not the clip
    expected = add_noise(
        own, (real_context - (1 - CFG.prefix_t) * x) / CFG.prefix_t, t_tr[:, :total]
    )
    torch.testing.assert_close(x_tr[:, :total], expected, atol=1e-5, rtol=1e-5)
    # The loss is against the real clips: recomputed from the training pass's inputs.
    noise = (x_tr[:, total:] - (1 - t_tr[:, total:, None, None, None]) * x) / t_tr[
        :, total:, None, None, None
    ]
    target = velocity_target(x, noise)
    torch.testing.assert_close(loss["loss"], torch.nn.functional.mse_loss(v_tr[:, total:], target))
    calls.clear()
    flow_matching_loss(model, x, torch.Generator().manual_seed(0), labels=labels, held_out=True)
    assert len(calls) == 1  # evaluation: no recycling pass
    for bad in (dict(context_recycle=1.5), dict(context_recycle_t=0.0)):
        with pytest.raises(ValueError, match="context_recycle"):
            dataclasses.replace(CFG, **bad)


def test_context_fade_scales_each_context_clips_contrast_and_keeps_the_targets(monkeypatch):
    """Fade augmentation: each context clip's deviations from its frames' medians are scaled
    by its own factor in [1 - context_fade, 1] before the usual prefix_t noise; the noisy
    frames and the targets are the real clips'; held-out evaluation never fades; off, the
    loss draws exactly what it drew before the option existed."""
    import dataclasses

    from vidgen.sampling.flow import add_noise, scale_contrast, velocity_target

    seen = []
    original = CausalVideoDiT.forward_history

    def spy(self, x, cond, mask, positions):
        out = original(self, x, cond, mask, positions)
        seen.append((x.detach(), cond.t.detach(), out.detach()))
        return out

    monkeypatch.setattr(CausalVideoDiT, "forward_history", spy)
    clips, total = 4, 4 * L
    x = latents(total, seed=8, batch=3) * 2  # contrast to scale
    labels = torch.tensor([1, 2, 3])
    off = randomize_(CausalVideoDiT(CFG), seed=4)
    on = randomize_(CausalVideoDiT(dataclasses.replace(CFG, context_fade=0.6)), seed=4)
    loss_off = flow_matching_loss(off, x, torch.Generator().manual_seed(0), labels=labels)
    loss_on = flow_matching_loss(on, x, torch.Generator().manual_seed(0), labels=labels)
    (x_off, t_off, _), (x_on, t_on, v_on) = seen
    assert torch.equal(t_on, t_off) and torch.equal(x_on[:, total:], x_off[:, total:])
    # Recover each context clip's factor from the unnoised context: (ctx - noise part) / (1-t).
    g = torch.Generator().manual_seed(0)
    context_noise = torch.randn(x.shape, generator=g)
    t = CFG.prefix_t
    faded = (x_on[:, :total] - t * context_noise) / (1 - t)
    torch.testing.assert_close(x_off[:, :total], add_noise(x, context_noise, torch.full((3,), t)))
    median = x.flatten(3).median(dim=3).values[..., None, None]
    dev, dev_faded = (x - median).flatten(2), (faded - median).flatten(2)
    factor = ((dev * dev_faded).sum(-1) / (dev * dev).sum(-1)).reshape(3, clips, L)
    assert torch.allclose(factor, factor[..., :1].expand_as(factor), atol=1e-4)  # per clip
    factor = factor[..., 0]
    assert (factor >= 0.4 - 1e-4).all() and (factor <= 1 + 1e-4).all() and factor.std() > 0.05
    expected = scale_contrast(x, factor.repeat_interleave(L, dim=1))
    torch.testing.assert_close(faded, expected, atol=1e-4, rtol=1e-4)
    # The targets are the real clips': the loss recomputed from the training pass's inputs.
    t_noisy = t_on[:, total:, None, None, None]
    noise = (x_on[:, total:] - (1 - t_noisy) * x) / t_noisy
    target = velocity_target(x, noise)
    torch.testing.assert_close(
        loss_on["loss"], torch.nn.functional.mse_loss(v_on[:, total:], target)
    )
    assert not torch.equal(loss_on["loss"], loss_off["loss"])
    seen.clear()
    flow_matching_loss(on, x, torch.Generator().manual_seed(0), labels=labels, held_out=True)
    flow_matching_loss(off, x, torch.Generator().manual_seed(0), labels=labels, held_out=True)
    assert torch.equal(seen[0][0], seen[1][0])  # evaluation: never faded
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="context_fade"):
            dataclasses.replace(CFG, context_fade=bad)


def test_context_noise_max_is_checked():
    import dataclasses

    with pytest.raises(ValueError, match="context_noise_max"):
        dataclasses.replace(CFG, context_noise_max=CFG.prefix_t / 2)
    with pytest.raises(ValueError, match="context_noise_max"):
        dataclasses.replace(CFG, context_noise_max=1.0)


def test_foreground_weight_weights_the_flow_loss_towards_objects(monkeypatch):
    """With foreground_weight w, latent positions whose summed channel distance from their
    frame's per-channel median exceeds foreground_threshold weigh 1 + w times the rest,
    normalised to mean 1; off (0) and held out, the loss is the plain mean squared error,
    drawing exactly what it drew before the option existed."""
    import dataclasses

    from vidgen.sampling.flow import velocity_target

    calls = []
    original = CausalVideoDiT.forward_history

    def spy(self, *args):
        out = original(self, *args)
        calls.append((args[0].detach(), args[1].t.detach(), out.detach()))
        return out

    monkeypatch.setattr(CausalVideoDiT, "forward_history", spy)
    total, size = 2 * L, CFG.latent_size
    x = 0.1 * latents(total, seed=8, batch=2)  # background: within 1 of the median
    x[:, :, 1, 0, 1] += 3.0  # one bright object position per frame
    x[0, 0, 2, 3, 3] = 0.7  # under the threshold: background
    labels = torch.tensor([1, 3])
    on = randomize_(CausalVideoDiT(dataclasses.replace(CFG, foreground_weight=4.0)), seed=4)
    off = randomize_(CausalVideoDiT(CFG), seed=4)
    loss_on = flow_matching_loss(on, x, torch.Generator().manual_seed(0), labels=labels)["loss"]
    loss_off = flow_matching_loss(off, x, torch.Generator().manual_seed(0), labels=labels)["loss"]
    (x_on, t_on, v_on), (x_off, _, v_off) = calls
    assert torch.equal(x_on, x_off) and torch.equal(v_on, v_off)  # same draws, same model
    t = t_on[:, total:, None, None, None]
    noise = (x_on[:, total:] - (1 - t) * x) / t
    se = (v_on[:, total:] - velocity_target(x, noise)) ** 2
    torch.testing.assert_close(loss_off, se.mean())
    # Per frame: 63 background positions of weight 1 and the object's of 5, over their mean.
    weight = torch.ones(2, total, 1, size, size)
    weight[:, :, 0, 0, 1] = 5.0
    weight /= (size**2 + 4) / size**2
    torch.testing.assert_close(loss_on, (weight * se).mean())
    assert not torch.allclose(loss_on, loss_off)
    held = flow_matching_loss(on, x, torch.Generator().manual_seed(0), labels, held_out=True)
    held_off = flow_matching_loss(off, x, torch.Generator().manual_seed(0), labels, held_out=True)
    torch.testing.assert_close(held["loss"], held_off["loss"])
    for bad in (dict(foreground_weight=-1.0), dict(foreground_threshold=0.0)):
        with pytest.raises(ValueError, match="foreground_weight must be >= 0"):
            dataclasses.replace(CFG, **bad)


def test_the_model_runs_in_float64_and_reads_a_cache_of_another_dtype(model):
    """The timestep features were always float32 (a float64 or bf16 model failed in its
    first layer), and a cache wider than the model promoted the context keys past the
    queries' dtype (float32 model, float64 cache: sdpa refused)."""
    import copy

    wide = copy.deepcopy(model).double()
    hist, noisy, acts = latents(L, seed=5), latents(L, seed=6), actions(2 * L, seed=7)
    outs = []
    with torch.no_grad():
        for m, dtype, cache_dtype in (
            (model, torch.float32, torch.float32),
            (model, torch.float32, torch.float64),
            (wide, torch.float64, torch.float64),
            (wide, torch.float64, torch.float32),
        ):
            cache = KVCache(m.cache_spec(1, cache_dtype))
            s = cache.add_stream()
            m.write(hist.to(dtype), cache, [s], actions=acts[:, :L])
            cond = Cond(t=torch.full((1, L), 0.6), labels=torch.tensor([2]), actions=acts[:, L:])
            out = m(noisy.to(dtype), cond, cache, [s])
            assert out.dtype == dtype
            outs.append(out.double())
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-4, rtol=0)


def test_a_full_cache_is_read_with_no_mask_tensor(model, monkeypatch):
    """DESIGN.md section 5: a clip after a full cache (or none) attends to every cached frame
    and causally to itself with no mask tensor (the fused kernels); a filling cache needs one."""
    import vidgen.models.ca2vdm as ca2vdm

    calls = []

    def spy(q, k, v, mask=None, causal=False, **kwargs):
        calls.append((q.shape[2], k.shape[2], mask is None, causal))
        return real(q, k, v, mask=mask, causal=causal, **kwargs)

    real = ca2vdm.attention
    monkeypatch.setattr(ca2vdm, "attention", spy)
    cache = KVCache(model.cache_spec())
    s = cache.add_stream()
    cond = Cond(t=torch.full((1, L), 0.5), labels=torch.tensor([2]), actions=actions(L))
    seen = []
    with torch.no_grad():
        for k in range(CFG.window_clips + 1):
            calls.clear()
            model(latents(L, seed=k), cond, cache, [s])
            temporal = [c for c in calls if c[0] == L]  # spatial calls attend over tokens
            seen.append({(lk, no_mask, causal) for _, lk, no_mask, causal in temporal})
            model.write(latents(L, seed=50 + k), cache, [s], actions=actions(L))
        calls.clear()
        model(latents(L), cond)  # no cache at all: causal over its own frames
        assert {c[1:] for c in calls if c[0] == L} == {(L, True, True)}
    w = CFG.window_clips * L
    assert all(s == {(w + L, False, False)} for s in seen[:-1])  # filling: key padding
    assert seen[-1] == {(w + L, True, True)}  # full: causal aligned to the last key


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # autocast's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_qkv_normalises_q_and_k_together_as_each_alone(dtype):
    """QKV normalises q and k in one call (stacked); each must equal its own RMSNorm, with its
    own weight, bit for bit, and v must be the projection's third part."""
    from einops import rearrange

    from vidgen.models.ca2vdm import QKV

    qkv = randomize_(QKV(32, 4), seed=3).to(dtype)
    qkv.k_norm.weight.data.mul_(-3)  # q's and k's weights must not be mixed up
    x = torch.randn(5, 7, 32).to(dtype)
    qk, v = qkv(x)
    q, k, v_ref = rearrange(qkv.proj(x), "b l (three h e) -> three b h l e", three=3, h=4)
    assert qk.shape == (2, 5, 4, 7, 8)
    assert torch.equal(qk[0], qkv.q_norm(q))
    assert torch.equal(qk[1], qkv.k_norm(k))
    assert torch.equal(v, v_ref)
    qkv.k_norm.eps = 1e-3  # unequal eps: normalised apart, the same values
    qk, _ = qkv(x)
    assert torch.equal(qk[1], qkv.k_norm(k)) and torch.equal(qk[0], qkv.q_norm(q))
    qkv.k_norm.eps = qkv.q_norm.eps
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as each alone under autocast too
        qk, _ = qkv(x)
        q, k, _ = rearrange(qkv.proj(x), "b l (three h e) -> three b h l e", three=3, h=4)
        assert torch.equal(qk[0], qkv.q_norm(q)) and torch.equal(qk[1], qkv.k_norm(k))


def test_clips_of_another_length_and_conds_of_another_shape_are_refused(model):
    """The cache holds whole clips and evicts by them: a 3-frame 'clip' (clip_len 2) was
    written and evicted as one, and cached predictions no longer matched the reference. A
    Cond for one row was broadcast over a batch."""
    cache = KVCache(model.cache_spec(max_streams=2))
    s = cache.add_stream()
    with torch.no_grad():
        with pytest.raises(ValueError, match=rf"clip_len={L}"):
            model.write(latents(L + 1), cache, [s])
        model.write(latents(L), cache, [s])
        cond = Cond(t=torch.full((1, L + 1), 0.5), labels=torch.tensor([1]))
        with pytest.raises(ValueError, match=rf"clip_len={L}"):
            model(latents(L + 1), cond, cache, [s])
        one_row = Cond(t=torch.full((1, L), 0.5), labels=torch.tensor([1]))
        with pytest.raises(ValueError, match=r"cond.t must be \(b, t\) = \(2, "):
            model(latents(L, batch=2), one_row, cache, [s, cache.add_stream()])
        assert model(latents(L), one_row, cache, [s]).shape == latents(L).shape
        # A context prepared for two streams read by a one-row clip failed in a concatenation.
        context = model.prepare_context(cache, [s, s])  # (as guidance reads a stream twice)
        with pytest.raises(ValueError, match="context was prepared for 2 streams, x has 1 rows"):
            model(latents(L), one_row, context)


def test_guidances_pass_is_trained_by_a_joint_drop_of_label_and_actions(monkeypatch):
    """Guidance's unconditional pass drops label and actions together; drawn independently
    at 10% each, that pass was 1% of training. ``joint_dropout`` drops both at once, for a
    model taking both; a model taking one draws nothing more (its training is unchanged)."""
    import dataclasses

    seen = []
    original = CausalVideoDiT.forward_history

    def spy(self, x, cond, mask, positions):
        seen.append((cond.drop_label[:, -1].clone(), cond.drop_actions[:, -1].clone()))
        return original(self, x, cond, mask, positions)

    monkeypatch.setattr(CausalVideoDiT, "forward_history", spy)
    b = 64
    x = latents(2 * L, seed=7, batch=b)
    labels, actions = torch.full((b,), 2), torch.randint(0, 5, (b, 2 * L))

    def drops(joint: float, **kwargs):
        cfg = dataclasses.replace(CFG, label_dropout=0.0, action_dropout=0.0, **kwargs)
        model = randomize_(CausalVideoDiT(dataclasses.replace(cfg, joint_dropout=joint)), seed=2)
        gen = torch.Generator().manual_seed(0)
        flow_matching_loss(model, x, gen, labels=labels, actions=actions)
        return seen.pop()

    label, action = drops(1.0)
    assert label.all() and action.all()
    label, action = drops(0.0)
    assert not label.any() and not action.any()
    label, action = drops(0.5)
    assert torch.equal(label, action) and 10 < int(label.sum()) < 54
    # A model without actions: the same loss and generator state whatever joint_dropout is.
    no_actions = dataclasses.replace(CFG, num_actions=0)
    model = randomize_(CausalVideoDiT(no_actions), seed=2)
    runs = []
    for joint in (0.0, 1.0):
        model.config = dataclasses.replace(no_actions, joint_dropout=joint)
        gen = torch.Generator().manual_seed(0)
        runs.append((flow_matching_loss(model, x, gen, labels=labels)["loss"], gen.get_state()))
        assert not seen.pop()[0].all()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_a_context_shared_by_denoising_steps_equals_the_reference(model):
    """As the generator runs: one ``prepare_context`` per clip, reused by every denoising
    step (its joined K/V buffers rewritten in place each step). The other equivalence tests
    read the cache afresh at each call, so a stale buffer (the clip's values of the first
    step kept) passed them."""
    clips = 4
    hist, acts = latents(clips * L, seed=3), actions((clips + 1) * L, seed=4)
    cache = KVCache(model.cache_spec())
    s = cache.add_stream()
    with torch.no_grad():
        for k in range(clips):
            ctx = model.prepare_context(cache, [s])
            for step, t in enumerate((1.0, 0.6, 0.2)):
                noisy = latents(L, seed=100 * k + step)
                clip_actions = acts[:, k * L : (k + 1) * L]
                cond = Cond(t=torch.full((1, L), t), labels=torch.tensor([2]), actions=clip_actions)
                out = model(noisy, cond, ctx)
                assert out.std() > 0.1
                ref = reference(model, hist[:, : k * L], acts[:, : (k + 1) * L], noisy, t, 2)
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            model.write(hist[:, k * L : (k + 1) * L], cache, [s], actions=clip_actions)


def test_flow_times_out_of_range_and_a_cache_of_another_window_are_refused(model):
    """t = 5 or NaN was embedded as it came (NaN frames out); a cache of another window was
    read without a word (history the model never saw)."""
    x = latents(L)
    with torch.no_grad():
        for t in (5.0, -0.5, float("nan")):
            cond = Cond(t=torch.full((1, L), t), labels=torch.tensor([2]), actions=actions(L))
            with pytest.raises(ValueError, match=r"cond.t must be flow times in \[0, 1\]"):
                model(x, cond)
        wide = KVCache(dataclasses.replace(model.cache_spec(), window=CFG.window * 2))
        s = wide.add_stream()
        cond = Cond(t=torch.full((1, L), 0.5), labels=torch.tensor([2]), actions=actions(L))
        with pytest.raises(ValueError, match="made for another model: its window is"):
            model(x, cond, wide, [s])
        with pytest.raises(ValueError, match="made for another model: its window is"):
            model.write(x, wide, [s], actions(L))
        # Latents of another shape or dtype failed in a matrix product, naming nothing.
        for bad, match in (
            (x[:, :, :-1], r"x must be latents \(b, t, "),
            (x[..., :-2, :-2], r"x must be latents \(b, t, "),
            (x.double(), "x must be torch.float32 latents"),
        ):
            with pytest.raises(ValueError, match=match):
                model(bad, cond)

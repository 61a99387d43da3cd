"""NBP invariants (DESIGN.md section 4, item 3) and token sampling; test size, random weights."""

import dataclasses

import pytest
import torch

from vidgen.models.nbp import (
    NBP_CONFIGS,
    ClipCond,
    NextBlockTransformer,
    Partial,
    nbp_loss,
)
from vidgen.nn import KVCache, banded_block_mask, block_causal_mask, randomize_
from vidgen.nn.conditioning import NULL
from vidgen.sampling.tokens import guide_logits, sample_tokens, top_k_filter, top_p_filter

CFG = NBP_CONFIGS["test"]
N, B, F = CFG.tokens_per_clip, CFG.block, CFG.frames_per_clip


def model(cfg=CFG, seed: int = 1) -> NextBlockTransformer:
    assert cfg.depth >= 2
    return randomize_(NextBlockTransformer(cfg), seed=seed).eval()


def sequence(clips: int, seed: int = 0, cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab, (1, clips * cfg.tokens_per_clip), generator=g)
    actions = torch.randint(0, cfg.num_actions, (1, clips * cfg.frames_per_clip), generator=g)
    return tokens, actions


def incremental_worst(m, tokens, actions, cache_cls=KVCache) -> float:
    """Worst |incremental block logits - banded reference| over every block of every clip."""
    cfg = m.config
    clips = tokens.shape[1] // cfg.tokens_per_clip
    with torch.no_grad():
        ref = m(tokens, ClipCond(labels=torch.tensor([2]), actions=actions))
        assert ref.std() > 0.1
        cache = cache_cls(m.cache_spec())
        s = cache.add_stream()
        prev, worst = None, 0.0
        for c in range(clips):
            acts = actions[:, c * cfg.frames_per_clip : (c + 1) * cfg.frames_per_clip]
            cc = m.clip_condition(
                ClipCond(labels=torch.tensor([2]), actions=acts), 1, tokens.device
            )
            part = Partial()
            for j in range(cfg.blocks_per_clip):
                logits, part = m.step_block(prev, cc, cache, part, [s])
                lo = c * cfg.tokens_per_clip + j * cfg.block
                worst = max(worst, (logits - ref[:, lo : lo + cfg.block]).abs().max().item())
                prev = tokens[:, lo : lo + cfg.block]
            m.commit(part, cache, [s])
    return worst


def test_mask_structure():
    m = banded_block_mask(3 * N, B, CFG.window_clips, group_size=N)[0, 0]
    for i in range(3 * N):
        for j in range(3 * N):
            expected = j // B <= i // B and j // N >= i // N - CFG.window_clips
            assert bool(m[i, j]) == expected
    assert torch.equal(banded_block_mask(16, 1, 99), block_causal_mask(16, 1))


def test_incremental_equals_banded_reference_across_evictions():
    tokens, actions = sequence(5)  # window of 2 clips: three evictions
    assert incremental_worst(model(), tokens, actions) < 1e-5


class OffByOne(KVCache):
    def query_positions(self, streams, num_frames):
        return super().query_positions(streams, num_frames) + 1


def test_a_position_off_by_one_is_caught():
    tokens, actions = sequence(3)
    assert incremental_worst(model(), tokens, actions, OffByOne) > 1e-3


def test_block_size_one_is_plain_causal_decoding():
    cfg = dataclasses.replace(CFG, block=1)
    m = model(cfg)
    tokens, actions = sequence(3, cfg=cfg)
    assert incremental_worst(m, tokens, actions) < 1e-5
    # Position i depends on tokens < i only: change token j, outputs at positions <= j stay.
    with torch.no_grad():
        cond = ClipCond(labels=torch.tensor([1]), actions=actions)
        base = m(tokens, cond)
        changed = tokens.clone()
        changed[0, 5] = (changed[0, 5] + 1) % cfg.vocab
        out = m(changed, cond)
    assert torch.equal(out[:, :6], base[:, :6]) and (out[:, 6:] - base[:, 6:]).abs().max() > 1e-4


def test_blocks_predict_in_parallel_and_see_only_earlier_blocks():
    m = model()
    tokens, actions = sequence(2)
    cond = ClipCond(labels=torch.tensor([1]), actions=actions)
    with torch.no_grad():
        base = m(tokens, cond)
        changed = tokens.clone()
        changed[0, B + 1] = (changed[0, B + 1] + 1) % CFG.vocab  # a token of block 1
        out = m(changed, cond)
    # Block 1's inputs are block 0's tokens: blocks 0 and 1 are unaffected, block 2 on is.
    assert torch.equal(out[:, : 2 * B], base[:, : 2 * B])
    assert (out[:, 2 * B :] - base[:, 2 * B :]).abs().max() > 1e-4
    # Positions inside a block see each other: token 2B-1 is the input at 3B-1, the last
    # position of block 2, and the block's first position 2B reads it (a causal mask would not).
    with torch.no_grad():
        changed = tokens.clone()
        changed[0, 2 * B - 1] = (changed[0, 2 * B - 1] + 1) % CFG.vocab
        out = m(changed, cond)
    assert torch.equal(out[:, : 2 * B], base[:, : 2 * B])
    assert (out[:, 2 * B] - base[:, 2 * B]).abs().max() > 1e-4


def test_label_and_actions_change_the_logits():
    m = model()
    tokens, actions = sequence(2)
    with torch.no_grad():
        base = m(tokens, ClipCond(labels=torch.tensor([1]), actions=actions))
        other = m(tokens, ClipCond(labels=torch.tensor([3]), actions=actions))
        null = m(tokens, ClipCond())
        acted = m(tokens, ClipCond(labels=torch.tensor([1]), actions=(actions + 1) % 5))
    for out in (other, null, acted):
        assert (out - base).abs().max() > 1e-3


def test_a_test_model_overfits_a_token_sequence():
    torch.manual_seed(0)
    m = NextBlockTransformer(CFG)
    tokens, actions = sequence(3, seed=5)
    cond = ClipCond(labels=torch.tensor([2]), actions=actions)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        loss = nbp_loss(m, tokens, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    with torch.no_grad():
        accuracy = (m(tokens, cond).argmax(-1) == tokens)[:, B:].float().mean()
    assert accuracy > 0.95  # (the first block follows BOS alone)


def test_top_k_keeps_k_and_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).sum() == 2
    assert torch.isfinite(top_k_filter(logits, 2))[0].tolist() == [True, False, True, False, False]
    probs = logits.softmax(-1)[0]  # 0.636, 0.086, 0.234, 0.032, 0.012
    kept = torch.isfinite(top_p_filter(logits, 0.8))[0].tolist()
    assert kept == [True, False, True, False, False]  # 0.636 < 0.8 <= 0.636 + 0.234
    assert torch.isfinite(top_p_filter(logits, 0.5))[0].tolist() == [True] + [False] * 4
    assert probs[0] >= 0.5 and torch.isfinite(top_p_filter(logits, 1.0)).all()
    # A p that rounds to 0 in float32 still keeps the most likely entry (it dropped them all,
    # and sampling failed on NaNs).
    assert torch.isfinite(top_p_filter(logits, 1e-50))[0].tolist() == [True] + [False] * 4


def test_sampling_draws_from_the_given_generator():
    logits = torch.randn(6, 10)
    a = sample_tokens(logits, torch.Generator().manual_seed(1), temperature=1.0, top_k=5)
    b = sample_tokens(logits, torch.Generator().manual_seed(1), temperature=1.0, top_k=5)
    assert torch.equal(a, b)
    c = sample_tokens(logits, torch.Generator().manual_seed(2), temperature=1.0, top_k=5)
    assert not torch.equal(a, c)
    assert torch.equal(sample_tokens(logits, None, temperature=0), logits.argmax(-1))
    for bad in (0.0, float("nan"), 1.5, float("inf")):  # above 1 was taken as "off"
        with pytest.raises(ValueError, match="top_p"):
            top_p_filter(logits, bad)
    with pytest.raises(ValueError, match="top_k must be >= 0"):  # negative was "off"
        top_k_filter(logits, -3)


def test_sampling_applies_temperature_top_k_and_top_p_together():
    """Over many draws: top_k / top_p keep only their ids, a low temperature is nearly
    greedy; each setting on its own, so that dropping any one of them is caught."""
    rows = torch.tensor([3.0, 1.0, 2.0, 0.0, -1.0]).expand(4000, 5)  # p 0.64 .09 .23 .03 .01

    def counts(**kwargs) -> list[int]:
        ids = sample_tokens(rows, torch.Generator().manual_seed(0), **kwargs)
        return torch.bincount(ids, minlength=5).tolist()

    plain = counts(temperature=1.0)
    assert all(n > 0 for n in plain) and plain[0] < 0.7 * len(rows)
    for kwargs in (dict(top_k=2), dict(top_p=0.8), dict(top_k=3, top_p=0.8)):
        kept = counts(temperature=1.0, **kwargs)  # the top two: ids 0 and 2
        assert kept[0] > 0 and kept[2] > 0 and kept[1] == kept[3] == kept[4] == 0, kwargs
    assert counts(temperature=1.0, top_k=3)[1] > 0 and counts(temperature=1.0, top_p=0.9)[1] > 0
    cold = counts(temperature=0.05, top_k=5, top_p=1.0)
    assert cold[0] > 0.99 * len(rows)
    hot = counts(temperature=2.0, top_k=5)
    assert hot[0] < plain[0] and hot[4] > plain[4]


def test_a_clip_without_any_action_is_conditioned_as_the_null_action():
    """A request without actions (and every context clip) gives per-frame null ids: the clip
    must get the learned null action, as actions=None and dropped actions do, never a mix
    of null ids the model was not trained on; a clip with one real action is not null."""
    m = randomize_(NextBlockTransformer(CFG), seed=1).eval()
    f, label = CFG.frames_per_clip, torch.tensor([2])
    nulls = torch.full((1, f), NULL, dtype=torch.int64)
    one = nulls.clone()
    one[0, -1] = 1
    with torch.no_grad():
        vectors = [
            m.clip_condition(ClipCond(labels=label, actions=a), 1, "cpu")
            for a in (None, nulls, one)
        ]
    assert torch.equal(vectors[0], vectors[1])
    assert not torch.allclose(vectors[1], vectors[2])


def test_guided_logits_keep_masked_tokens_out_and_tiny_temperatures_are_greedy():
    inf = float("inf")
    c = torch.tensor([[2.0, 1.0, -inf, 0.5]])
    u = torch.tensor([[1.0, 1.0, -inf, -inf]])
    assert guide_logits(c, u, 2.0).tolist() == [[3.0, 1.0, -inf, 0.5]]
    assert guide_logits(c, u, 1.0).tolist() == c.tolist()
    assert guide_logits(u, c, 2.0).tolist() == [[0.0, 1.0, -inf, -inf]]  # out where c is
    assert guide_logits(u, c, 0.0).tolist() == [[2.0, 1.0, -inf, 0.5]]  # the unconditional
    scale = torch.tensor([[2.0], [0.0]])  # per row, as the generator passes it
    assert guide_logits(torch.cat([u, u]), torch.cat([c, c]), scale)[1].tolist() == c[0].tolist()
    assert int(sample_tokens(guide_logits(c, u, 3.0), None, temperature=0)) == 0
    # Scale 0 is the unconditional logits even where only they are out (it gave c's 0.5).
    assert guide_logits(c, u, 0.0).tolist() == u.tolist()
    logits = torch.tensor([[0.0, 5.0, 4.999]])
    for temperature in (1e-39, 1e-6):
        assert int(sample_tokens(logits, torch.Generator(), temperature=temperature)) == 1


def test_token_noise_corrupts_inputs_only_and_is_off_by_default():
    torch.manual_seed(0)
    tokens, actions = sequence(3, seed=5)
    cond = ClipCond(labels=torch.tensor([2]), actions=actions)
    clean_model = NextBlockTransformer(CFG).eval()
    clean = nbp_loss(clean_model, tokens, cond)
    # Off (the default): a generator changes nothing and draws nothing.
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(nbp_loss(clean_model, tokens, cond, gen), clean)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(1).get_state())

    noisy_model = NextBlockTransformer(dataclasses.replace(CFG, token_noise=0.3)).eval()
    noisy_model.load_state_dict(clean_model.state_dict())
    assert torch.equal(nbp_loss(noisy_model, tokens, cond), clean)  # no generator: clean
    noisy = nbp_loss(noisy_model, tokens, cond, torch.Generator().manual_seed(1))
    # The same draws by hand: inputs corrupted, the targets the clean tokens.
    gen = torch.Generator().manual_seed(1)
    hit = torch.rand(tokens.shape, generator=gen) < 0.3
    inputs = torch.where(hit, torch.randint(0, CFG.vocab, tokens.shape, generator=gen), tokens)
    logits = clean_model(inputs, cond).flatten(0, 1)
    expected = torch.nn.functional.cross_entropy(logits, tokens.flatten())
    assert torch.allclose(noisy, expected) and not torch.allclose(noisy, clean)
    assert 0 < hit.float().mean() < 0.6 and (inputs != tokens).any()  # 24 tokens: loose
    with pytest.raises(ValueError, match="token_noise"):
        dataclasses.replace(CFG, token_noise=1.0)


def test_a_drop_mask_of_the_wrong_shape_is_refused():
    """A (b,) drop mask broadcast against (b, clips) along the clip axis: row 1 took row 0's
    flag. Masks are (b, clips) or (b, 1)."""
    m = model()
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        kept = m.clip_condition(ClipCond(labels=labels), 2, "cpu")
        per_row = torch.tensor([[True], [False]])
        dropped = m.clip_condition(ClipCond(labels=labels, drop_label=per_row), 2, "cpu")
        assert torch.equal(dropped[1], kept[1]) and not torch.equal(dropped[0], kept[0])
        for name in ("drop_label", "drop_actions"):
            with pytest.raises(ValueError, match=f"ClipCond.{name} must be"):
                m.clip_condition(ClipCond(labels=labels, **{name: per_row[:, 0]}), 2, "cpu")


def test_training_drops_the_condition_per_sequence_as_guidance_uses_it():
    """Guidance's unconditional pass runs on a history in which every clip dropped the label
    and actions; training must show the model such sequences, so a drop covers every clip of
    a sequence (per-clip drops would almost never drop all of them)."""
    from vidgen.train.tokens import clip_condition

    cfg = dataclasses.replace(
        CFG, num_classes=4, num_actions=3, label_dropout=0.5, action_dropout=0.5
    )
    b, clips = 256, 4
    batch = {
        "tokens": torch.zeros(b, clips * 8, dtype=torch.long),
        "label": torch.randint(0, 4, (b,)),
        "actions": torch.randint(0, 3, (b, clips * 8)),
    }
    cond = clip_condition(cfg, batch, clips, torch.Generator().manual_seed(0))
    for drop in (cond.drop_label, cond.drop_actions):
        assert drop.shape == (b, clips)
        assert (drop == drop[:, :1]).all()  # whole sequences
        assert 0.35 < drop[:, 0].float().mean() < 0.65
    assert not torch.equal(cond.drop_label, cond.drop_actions)  # drawn apart
    kept = clip_condition(cfg, batch, clips, None)
    assert not kept.drop_label.any() and not kept.drop_actions.any()


def test_top_p_keeps_ties_of_the_least_likely_kept_entry():
    """Equal logits at the nucleus boundary were split by sort order (one kept, its twin
    dropped); ties are kept, as top_k keeps them. Without ties nothing changes."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert torch.isfinite(top_p_filter(logits, 0.3))[0].tolist() == [False, True, True, False]
    assert torch.isfinite(top_p_filter(torch.zeros(1, 4), 0.5)).all()
    gen = torch.Generator().manual_seed(0)
    for p in (0.1, 0.5, 0.9, 0.99):
        x = torch.randn(6, 50, generator=gen)
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= p
        drop[..., 0] = False
        ref = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        assert torch.equal(top_p_filter(x, p), ref)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 1e39, -1.0])
def test_sample_tokens_refuses_a_temperature_it_cannot_divide_by(temperature):
    """NaN and infinity (also a float beyond float32's range) made NaN probabilities, which
    torch.multinomial refused without naming the temperature."""
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    with pytest.raises(ValueError, match="temperature must be finite and >= 0, got"):
        sample_tokens(logits, None, temperature=temperature)
    assert sample_tokens(logits, None, temperature=3e38).item() in (0, 2)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_tokens_checks_its_filters_and_refuses_nan_logits_at_any_temperature(temperature):
    """The greedy path called no filter, so top_p=-3 was taken there; and argmax takes NaN for
    the largest logit: a diverged model's greedy tokens were garbage without a word."""
    logits = torch.tensor([[0.0, 1.0, 5.0]])
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_tokens(logits, None, temperature, top_p=-3.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_tokens(logits, None, temperature, top_p=float("nan"))
    with pytest.raises(ValueError, match="top_k must be an int"):
        sample_tokens(logits, None, temperature, top_k=2.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_tokens(logits, None, temperature, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        sample_tokens(logits, None, temperature, top_k=-3)
    with pytest.raises(ValueError, match="logits hold NaN"):
        sample_tokens(torch.tensor([[0.0, float("nan"), 5.0]]), None, temperature)
    assert sample_tokens(logits, None, temperature, top_k=1).item() == 2


def test_top_p_sums_half_precision_logits_in_float32():
    """A bfloat16 running sum stopped short of p (kept mass 0.893 of 0.9 asked): half
    precision logits keep what their float32 values keep."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(16, 1000, generator=gen) * 3).to(dtype)
        kept = torch.isfinite(top_p_filter(x, 0.9))
        assert torch.equal(kept, torch.isfinite(top_p_filter(x.float(), 0.9)))
        assert (x.float().softmax(-1) * kept).sum(-1).min() >= 0.9


def test_malformed_conditions_are_refused():
    """One clip's actions for three clips (broadcast to every clip), two clips' actions for
    one (only the first read), label num_classes (the null row read as a label), labels for a
    batch of one given to two rows, and labels or actions for a model without them were all
    taken without a word."""
    m = model()
    tokens, actions = sequence(3)
    tokens = tokens.expand(2, -1)
    actions = actions.expand(2, -1)
    label = torch.tensor([1, 2])
    assert m(tokens, ClipCond(labels=label, actions=actions)).shape[0] == 2
    bad = [
        (ClipCond(labels=label, actions=actions[:, :F]), "actions must be integer"),
        (ClipCond(labels=torch.tensor([1]), actions=actions), r"labels must be integer \(b,\)"),
        (ClipCond(labels=torch.tensor([1, CFG.num_classes])), r"labels must be in \[0, "),
        (ClipCond(actions=torch.full_like(actions, CFG.num_actions)), r"actions must be in"),
    ]
    for cond, message in bad:
        with pytest.raises(ValueError, match=message):
            m(tokens, cond)
    with pytest.raises(ValueError, match="actions must be integer"):
        m.clip_condition(ClipCond(labels=label, actions=actions[:, : 2 * F]), 2, tokens.device)
    plain = model(dataclasses.replace(CFG, num_classes=0, num_actions=0))
    for cond, message in (
        (ClipCond(labels=label), "without labels"),
        (ClipCond(actions=actions), "without actions"),
    ):
        with pytest.raises(ValueError, match=message):
            plain(tokens, cond)


def test_guidances_pass_is_trained_by_a_joint_drop_of_label_and_actions():
    """As in the diffusion family: ``joint_dropout`` drops label and actions of a sequence
    together for a model taking both; a model taking one draws nothing more."""
    from vidgen.train.tokens import clip_condition

    cfg = dataclasses.replace(NBP_CONFIGS["test"], label_dropout=0.0, action_dropout=0.0)
    b, clips = 64, 3
    batch = {
        "tokens": torch.zeros(b, clips * cfg.tokens_per_clip, dtype=torch.int64),
        "label": torch.full((b,), 2),
        "actions": torch.randint(0, 5, (b, clips * cfg.frames_per_clip)),
    }

    def drops(config):
        gen = torch.Generator().manual_seed(0)
        cond = clip_condition(config, batch, clips, gen)
        return cond.drop_label, cond.drop_actions, gen.get_state()

    label, action, _ = drops(dataclasses.replace(cfg, joint_dropout=1.0))
    assert label.all() and action.all()
    label, action, _ = drops(dataclasses.replace(cfg, joint_dropout=0.0))
    assert not label.any() and not action.any()
    label, action, _ = drops(dataclasses.replace(cfg, joint_dropout=0.5))
    assert torch.equal(label, action) and 10 < int(label[:, 0].sum()) < 54
    assert torch.equal(label, label[:, :1].expand_as(label))  # per sequence, every clip
    no_actions = dataclasses.replace(cfg, num_actions=0, label_dropout=0.1)
    plain = drops(dataclasses.replace(no_actions, joint_dropout=0.0))
    joint = drops(dataclasses.replace(no_actions, joint_dropout=1.0))
    assert torch.equal(plain[0], joint[0]) and torch.equal(plain[2], joint[2])
    assert not joint[0].all()


def test_a_cache_of_another_shape_tokens_out_of_range_and_a_block_past_the_clip_are_refused():
    """A cache of another window was read without a word (another depth: extra layers
    ignored); ids past the vocabulary failed in the embedding as an IndexError (a device-side
    assert on a GPU); step_block went on past the clip's last block, giving logits of
    positions outside it."""
    m = model()
    cc = m.clip_condition(ClipCond(labels=torch.tensor([2]), actions=sequence(1)[1]), 1, "cpu")
    for field, value in (("window", CFG.window * 2), ("layers", CFG.depth + 1)):
        other = KVCache(dataclasses.replace(m.cache_spec(), **{field: value}))
        s = other.add_stream()
        with pytest.raises(ValueError, match=f"made for another model: its {field} is {value}"):
            m.step_block(None, cc, other, Partial(), [s])
    tokens, actions = sequence(1)
    cond = ClipCond(labels=torch.tensor([2]), actions=actions)
    for bad, match in (
        (tokens.clone().fill_(CFG.vocab), rf"tokens must be token ids in \[0, {CFG.vocab}\)"),
        (tokens.clone().fill_(-1), r"tokens must be token ids in \[0,"),
        (tokens.float(), "tokens must be integer token ids, got torch.float32"),
    ):
        with pytest.raises(ValueError, match=match):
            m(bad, cond)
    cache = KVCache(m.cache_spec())
    s = cache.add_stream()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"prev must be token ids in \[-1,"):
            m.step_block(torch.full((1, B), CFG.vocab), cc, cache, Partial(), [s])
        part, prev = Partial(), None
        for j in range(CFG.blocks_per_clip):
            _, part = m.step_block(prev, cc, cache, part, [s])
            prev = tokens[:, j * B : (j + 1) * B]
        with pytest.raises(ValueError, match=f"the clip's {N} tokens are all fed"):
            m.step_block(prev, cc, cache, part, [s])
        m.commit(part, cache, [s])  # the clip itself is whole


def test_block_step_inputs_of_another_batch_or_shape_are_refused():
    """A prev of one row (or 1-D) was broadcast over every stream's block without a word, an
    integer clip_cond was added as it came; a context, partial or streams of another batch
    and a clip_cond of another shape failed deep inside (a concatenation, einops)."""
    m = model()
    cache = KVCache(m.cache_spec(max_streams=2))
    s = [cache.add_stream(), cache.add_stream()]
    acts = sequence(1)[1].expand(2, -1)
    cc = m.clip_condition(ClipCond(labels=torch.tensor([2, 1]), actions=acts), 2, "cpu")
    prev = torch.zeros(2, B, dtype=torch.int64)
    with torch.no_grad():
        _, part = m.step_block(None, cc, cache, Partial(), s)
        for bad in (prev[:1], prev[0], prev[:, :-1]):
            with pytest.raises(ValueError, match=rf"prev must .* \(b, block\) = \(2, {B}\)"):
                m.step_block(bad, cc, cache, part, s)
        for bad in (cc[:, None], cc[:, :-1], cc.long()):
            with pytest.raises(ValueError, match=rf"clip_cond must be float \(b, dim={CFG.dim}\)"):
                m.step_block(None, bad, cache, Partial(), s)
        with pytest.raises(ValueError, match=r"streams must name one cache stream per row .*\(1\)"):
            m.step_block(None, cc[:1], cache, Partial(), s)
        with pytest.raises(ValueError, match="context was prepared for 2 streams, clip_cond has 1"):
            m.step_block(None, cc[:1], m.prepare_context(cache, s), Partial())
        with pytest.raises(ValueError, match="partial holds the blocks of 2 streams"):
            m.step_block(prev[:1], cc[:1], cache, part, s[:1])
        # What was refused is made from the right inputs.
        logits, _ = m.step_block(prev, cc, cache, part, s)
        assert logits.shape == (2, B, CFG.vocab)

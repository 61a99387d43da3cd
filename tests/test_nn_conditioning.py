import pytest
import torch
from torch import nn

from vidgen.nn import (
    NULL,
    ActionEmbedding,
    AdaLNModulation,
    AdaLNZeroResidual,
    FrameCondition,
    LabelEmbedding,
    TimestepEmbedding,
    modulate,
    randomize_,
)


def branch(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


def test_adaln_zero_is_identity_at_init_and_random_is_not():
    torch.manual_seed(0)
    block = AdaLNZeroResidual(16, 8, branch(16))
    x, cond = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 8)
    assert torch.equal(block(x, cond), x)
    randomize_(block, seed=1)
    out = block(x, cond)
    assert (out - x).std() > 0.1
    # The modulation is per frame: changing frame 1's condition changes only frame 1.
    cond2 = cond.clone()
    cond2[:, 1] += 1.0
    diff = (block(x, cond2) - out).abs().amax(dim=(0, 2, 3))
    assert diff[1] > 1e-3 and diff[0] == 0 and diff[2] == 0


def test_timestep_embedding_distinguishes_timesteps():
    emb = randomize_(TimestepEmbedding(32), seed=0)
    out = emb(torch.tensor([0.0, 1.0, 500.0]))
    assert out.shape == (3, 32)
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3


def test_label_embedding_null_and_drop():
    emb = randomize_(LabelEmbedding(4, 8), seed=0)
    labels = torch.tensor([0, 3, NULL])
    out = emb(labels)
    torch.testing.assert_close(out[2], emb.table.weight[4])
    dropped = emb(labels, drop=torch.tensor([True, False, False]))
    torch.testing.assert_close(dropped[0], emb.table.weight[4])
    torch.testing.assert_close(dropped[1], out[1])
    with pytest.raises(ValueError, match="labels must be in"):
        emb(torch.tensor([4]))


def test_discrete_and_continuous_actions():
    disc = randomize_(ActionEmbedding(8, num_actions=5), seed=0)
    a = torch.tensor([[0, 4, NULL]])
    out = disc(a)
    assert out.shape == (1, 3, 8)
    torch.testing.assert_close(out[0, 2], disc.table.weight[5])
    # Dropped frames (guidance's unconditional rows, training's action dropout) get the null
    # action whatever action they carry; (b,) drops whole rows.
    b = torch.tensor([[0, 4, 1], [2, 3, 1]])
    dropped = disc(b, drop=torch.tensor([[False, True, False], [False, False, False]]))
    torch.testing.assert_close(dropped[0, 1], disc.table.weight[5])
    torch.testing.assert_close(dropped[0, 0], disc.table.weight[0])
    torch.testing.assert_close(dropped[1], disc(b)[1])
    rows = disc(b, drop=torch.tensor([True, False]))
    torch.testing.assert_close(rows[0], disc.table.weight[5].expand(3, -1))
    torch.testing.assert_close(rows[1], disc(b)[1])
    cont = randomize_(ActionEmbedding(8, action_dim=2), seed=0)
    v = torch.tensor([[[0.5, -1.0], [0.0, 0.0]]])
    out = cont(v, drop=torch.tensor([[False, True]]))
    torch.testing.assert_close(out[0, 1], cont.null)
    assert (out[0, 0] - cont.null).abs().max() > 1e-3
    with pytest.raises(ValueError, match="exactly one"):
        ActionEmbedding(8)


def test_frame_condition_sums_per_frame():
    cond = randomize_(FrameCondition(16, num_classes=4, num_actions=5), seed=0)
    t = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    labels, actions = torch.tensor([2]), torch.tensor([[1, 2, 3, 4]])
    out = cond(t, labels, actions)
    assert out.shape == (1, 4, 16)
    expected = cond.timestep(t) + cond.label(labels)[:, None] + cond.action(actions)
    torch.testing.assert_close(out, expected)
    # No label/actions given = the null condition, which differs from a real one (CFG).
    null = cond(t)
    torch.testing.assert_close(null, cond(t, torch.tensor([NULL]), torch.full((1, 4), NULL)))
    assert (null - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="without labels"):
        FrameCondition(16)(t, labels)


def test_frame_condition_refuses_labels_or_actions_that_would_broadcast():
    """One label for a batch of 4, or one action for a clip of 6 frames, broadcast silently
    and conditioned every row or frame on it."""
    cond = randomize_(FrameCondition(8, num_classes=4, num_actions=5), seed=0)
    t = torch.zeros(4, 6)
    assert cond(t, torch.arange(4), torch.zeros(4, 6, dtype=torch.int64)).shape == (4, 6, 8)
    with pytest.raises(ValueError, match=r"labels must be \(b,\) = \(4,\).*got \(1,\)"):
        cond(t, torch.tensor([2]))
    with pytest.raises(ValueError, match=r"actions must start with \(b, t\) = \(4, 6\)"):
        cond(t, torch.arange(4), torch.zeros(4, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="t must be"):
        cond(torch.zeros(4))


def test_modulation_over_tokens_is_the_chunks_broadcast_over_a_frames_tokens():
    """The DiT blocks take their shifts, scales and gates as (b, t, 1, d) views: the same
    values as the chunks, and ``modulate`` gives the same bits either way."""
    mod = randomize_(AdaLNModulation(8, 6, chunks=3), seed=0)
    cond, x = torch.randn(2, 5, 6), torch.randn(2, 5, 4, 8)
    chunks, views = mod(cond), mod(cond, over_tokens=True)
    assert [v.shape for v in views] == [torch.Size([2, 5, 1, 8])] * 3
    for chunk, view in zip(chunks, views, strict=True):
        assert torch.equal(chunk[:, :, None], view)
    assert torch.equal(modulate(x, views[0], views[1]), modulate(x, chunks[0], chunks[1]))
    # Each frame's own modulation: frame 1 of row 0 is x * (1 + scale) + shift there.
    expected = x[0, 1] * (1 + chunks[1][0, 1]) + chunks[0][0, 1]
    assert torch.allclose(modulate(x, *views[:2])[0, 1], expected)


def test_frame_condition_refuses_drop_masks_that_would_broadcast():
    """A (1,) drop mask silently dropped every row of a batch, and a longer one made the
    condition's batch larger than the frames' (an unrelated shape error later): both are
    refused by name; (b,) and (b, t) are taken."""
    fc = randomize_(FrameCondition(8, num_classes=3, num_actions=4), seed=0)
    t, labels = torch.rand(3, 2), torch.tensor([0, 1, 2])
    actions = torch.randint(0, 4, (3, 2))
    for name in ("drop_label", "drop_actions"):
        for bad in (torch.tensor([True]), torch.ones(4, dtype=torch.bool)):
            with pytest.raises(ValueError, match=rf"{name} must be \(b,\) = \(3,\)"):
                fc(t, labels, actions, **{name: bad})
        for good in (torch.ones(3, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool)):
            assert fc(t, labels, actions, **{name: good}).shape == (3, 2, 8)


def test_frame_condition_refuses_float_labels_and_integer_drop_masks():
    """A float label failed as an embedding index and a bool one read as class 0 or 1; 0/1
    integer drop masks failed in torch.where. Each is refused naming the argument."""
    fc = randomize_(FrameCondition(8, num_classes=3, num_actions=4), seed=0)
    t, labels = torch.rand(3, 2), torch.tensor([0, 1, 2])
    for bad in (labels.float(), labels.bool()):
        with pytest.raises(ValueError, match=f"labels must be integer class ids, got {bad.dtype}"):
            fc(t, bad)
    for name in ("drop_label", "drop_actions"):
        with pytest.raises(ValueError, match=f"{name} must be a bool mask .* got torch.int64"):
            fc(t, labels, **{name: torch.tensor([0, 1, 0])})
    # int32 labels are class ids too.
    assert torch.equal(fc(t, labels.int()), fc(t, labels))

import pytest
import torch

from vidgen.nn import RoPE1D, RoPE3D, apply_rope, attention, rope_angles


def test_shifting_positions_keeps_dot_products():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 32, generator=gen), torch.randn(2, 10, 32, generator=gen)
    rope = RoPE1D(32)
    pos = torch.arange(10)
    scores = rope(q, pos) @ rope(k, pos).transpose(-1, -2)
    for shift in (1, 37, 100_003):
        shifted = rope(q, pos + shift) @ rope(k, pos + shift).transpose(-1, -2)
        torch.testing.assert_close(shifted, scores, atol=1e-4, rtol=1e-5)
    # Positions matter at all (a rope that ignored them would pass the lines above).
    unrotated = q @ k.transpose(-1, -2)
    assert (scores - unrotated).abs().max() > 0.1


def test_rotation_keeps_norms():
    x = torch.randn(3, 7, 16)
    out = RoPE1D(16)(x, torch.arange(7) * 5)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_window_relative_equals_absolute_after_eviction():
    # A long video: 40 frames made, the window holds the last 12. Attention of a new clip
    # over the window, with window-relative positions, equals attention with absolute ones.
    gen = torch.Generator().manual_seed(1)
    d, made, window, clip = 16, 40, 12, 4
    keys = torch.randn(1, 2, made, d, generator=gen)  # unrotated, as cached
    values = torch.randn(1, 2, made, d, generator=gen)
    q = torch.randn(1, 2, clip, d, generator=gen)
    rope = RoPE1D(d)
    k_win, v_win = keys[:, :, -window:], values[:, :, -window:]
    absolute_k = torch.arange(made - window, made)
    absolute_q = torch.arange(made, made + clip)
    relative_k, relative_q = absolute_k - (made - window), absolute_q - (made - window)
    out_abs = attention(rope(q, absolute_q), rope(k_win, absolute_k), v_win)
    out_rel = attention(rope(q, relative_q), rope(k_win, relative_k), v_win)
    torch.testing.assert_close(out_rel, out_abs, atol=1e-5, rtol=1e-5)
    wrong = attention(rope(q, relative_q + 1), rope(k_win, relative_k), v_win)  # off by one
    assert (wrong - out_abs).abs().max() > 1e-3


def test_rope_3d_splits_the_head_dim_by_axis():
    rope = RoPE3D(24)
    assert sum(rope.split) == 24 and all(s % 2 == 0 for s in rope.split)
    t, h, w = torch.tensor([0, 3]), torch.tensor([1, 1]), torch.tensor([2, 5])
    angles = rope.angles(t, h, w)
    assert angles.shape == (2, 12)
    dt, dh, _ = (s // 2 for s in rope.split)
    torch.testing.assert_close(angles[:, :dt], rope_angles(t, rope.split[0]))
    torch.testing.assert_close(angles[:, dt : dt + dh], rope_angles(h, rope.split[1]))
    # Shift invariance per axis.
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 24, generator=gen), torch.randn(2, 24, generator=gen)
    base = (rope(q, t, h, w) * rope(k, t, h, w)).sum()
    moved = (rope(q, t + 9, h + 4, w - 2) * rope(k, t + 9, h + 4, w - 2)).sum()
    torch.testing.assert_close(moved, base, atol=1e-4, rtol=1e-5)


def test_apply_rope_checks_shapes():
    import pytest

    with pytest.raises(ValueError, match="head_dim/2"):
        apply_rope(torch.randn(2, 8), torch.zeros(2, 3))
    # Positions for 4 tokens on 3: a raw broadcast error naming neither.
    with pytest.raises(ValueError, match="angles are for 4 positions, x has 3"):
        apply_rope(torch.randn(1, 2, 3, 8), torch.zeros(4, 4))
    assert apply_rope(torch.randn(1, 2, 3, 8), torch.zeros(1, 4)).shape == (1, 2, 3, 8)
    for dim in (3, 5):  # odd: once split unevenly into a wrong shape without a word
        with pytest.raises(ValueError, match=f"head dim must be even .* got {dim}"):
            apply_rope(torch.randn(1, 4, dim), torch.zeros(4, dim // 2))


def test_float64_inputs_are_rotated_in_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 16, generator=gen, dtype=torch.float64)
    angles = rope_angles(torch.arange(8) * 1000, 16)
    out = apply_rope(x, angles)
    assert out.dtype == torch.float64
    half = 8
    cos, sin = angles.cos(), angles.sin()
    exact = torch.cat(
        [x[..., :half] * cos - x[..., half:] * sin, x[..., :half] * sin + x[..., half:] * cos], -1
    )
    assert (out - exact).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_precomputed_rotation_rotates_bit_for_bit_as_its_angles(dtype):
    """The DiT computes its rotation once per forward and every layer shares it; that must
    not change a single bit of what the angles gave."""
    from vidgen.nn.rope import Rotation

    x = torch.randn(3, 2, 7, 16).to(dtype)
    angles = rope_angles(torch.arange(7) * 1000 + 5, 16)
    assert torch.equal(apply_rope(x, Rotation.of(angles)), apply_rope(x, angles))
    # Converted once to the dtype it is applied in (the models do, per forward): the same.
    rot = Rotation.of(angles).for_dtype(dtype)
    assert rot.cos.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(apply_rope(x, rot), apply_rope(x, angles))
    # q and k stacked (2, ...) are rotated in one call, each as if alone.
    qk = torch.randn(2, 3, 2, 7, 16).to(dtype)
    both = apply_rope(qk, rot)
    assert torch.equal(both[0], apply_rope(qk[0], angles))
    assert torch.equal(both[1], apply_rope(qk[1], angles))
    with pytest.raises(ValueError, match="head_dim/2 = 8"):
        apply_rope(x, Rotation.of(rope_angles(torch.arange(7), 8)))

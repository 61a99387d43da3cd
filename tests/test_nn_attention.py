import pytest
import torch
import torch.nn.functional as F

from vidgen.nn import (
    BackendUnavailable,
    attention,
    available_backends,
    backend_unavailable_reason,
    banded_block_mask,
    block_causal_mask,
    key_padding_mask,
    to_block_mask,
)

BACKENDS = available_backends("cpu")


def reference(q, k, v, mask=None):
    """float64 softmax(QK^T/sqrt(d))V, written out."""
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def qkv(b=2, h=4, lq=24, lk=24, d=16, kv_heads=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen)
    k = torch.randn(b, kv_heads or h, lk, d, generator=gen)
    v = torch.randn(b, kv_heads or h, lk, d, generator=gen)
    return q, k, v


MASKS = {
    "none": lambda: None,
    "block_causal": lambda: block_causal_mask(24, 4),
    "block_causal_prefix": lambda: block_causal_mask(24, 5, prefix_len=4),
    "banded": lambda: banded_block_mask(24, 2, window=1, group_size=8),
    "padding": lambda: key_padding_mask([24, 13], 24),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_backends_match_float64_reference(backend, mask_name):
    q, k, v = qkv()
    mask = MASKS[mask_name]()
    out = attention(q, k, v, mask=mask, backend=backend)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert rel_err(out, reference(q, k, v, mask)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_query_and_cross_lengths(backend):
    q, k, v = qkv(lq=8, lk=40, kv_heads=2)
    mask = key_padding_mask([40, 31], 40)
    assert rel_err(attention(q, k, v, mask, backend=backend), reference(q, k, v, mask)) < 1e-5


def test_flex_block_mask_equals_dense_mask():
    q, k, v = qkv(lq=48, lk=48)
    dense = block_causal_mask(48, 8)
    expected = reference(q, k, v, dense)
    for block_mask in (
        to_block_mask(dense, block_size=16),
        block_causal_mask(48, 8, flex=True, tile=16),
    ):
        out = attention(q, k, v, mask=block_mask)  # auto -> flex
        assert rel_err(out, expected) < 1e-5
    banded = banded_block_mask(48, 4, window=2, group_size=8, flex=True, tile=16)
    out = attention(q, k, v, mask=banded, backend="flex")
    assert rel_err(out, reference(q, k, v, banded_block_mask(48, 4, window=2, group_size=8))) < 1e-5


def test_masks_change_the_output():
    # Guards the comparisons above against masks that are silently ignored.
    q, k, v = qkv()
    full = attention(q, k, v)
    for name in ("block_causal", "banded", "padding"):
        assert (attention(q, k, v, MASKS[name]()) - full).abs().max() > 1e-2, name


def test_unavailable_backend_raises_with_reason():
    q, k, v = qkv()
    reason = backend_unavailable_reason("xformers", "cpu")
    assert reason is not None and "CUDA" in reason
    with pytest.raises(BackendUnavailable, match="xformers.*CUDA"):
        attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="flash9")
    # "auto" is a backend the error lists; it always runs (sdpa at worst).
    assert backend_unavailable_reason("auto", "cpu") is None


def test_bad_inputs_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="mask must be"):
        attention(q, k, v, mask=torch.ones(24, 24, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \(2 or 1, 1, 24 or 1, 24\)"):
        attention(q, k, v, mask=torch.ones(1, 1, 24, 23, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="needs backend 'flex'"):
        attention(q, k, v, mask=block_causal_mask(24, 4, flex=True), backend="sdpa")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_that_sees_no_key_gets_zeros_on_every_backend(backend):
    q, k, v = qkv(lq=4, lk=6)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :] = False  # query 2 sees nothing
    out = attention(q, k, v, mask=mask, backend=backend)
    assert not out.isnan().any()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize(("lq", "lk"), [(8, 32), (8, 8), (1, 5)])
def test_causal_is_aligned_to_the_last_key_on_every_backend(backend, lq, lk):
    """A clip after a full cache: query i sees every key up to lk - lq + i, no mask passed."""
    q, k, v = qkv(lq=lq, lk=lk, kv_heads=2)
    pattern = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    expected = reference(q, k, v, pattern[None, None])
    assert rel_err(attention(q, k, v, backend=backend, causal=True), expected) < 1e-5
    if lq < lk:  # not the top-left alignment
        top_left = torch.ones(lq, lk, dtype=torch.bool).tril()[None, None]
        assert rel_err(reference(q, k, v, top_left), expected) > 1e-2
    if lq > 1:  # nor no mask at all
        assert rel_err(reference(q, k, v), expected) > 1e-2


@pytest.mark.parametrize(("lq", "lk"), [(8, 32), (3, 5)])
def test_causal_on_the_cpu_is_torchs_lower_right_bias_bit_for_bit(lq, lk):
    """On the CPU the lower-right causal pattern goes to sdpa as a cached mask tensor, not as
    torch's CausalBias (slower there): the same outputs to the bit, and a second call (the
    cached mask) too."""
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = qkv(lq=lq, lk=lk)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk))
    assert torch.equal(attention(q, k, v, causal=True), expected)
    assert torch.equal(attention(q, k, v, causal=True), expected)


def test_flex_refuses_training_on_the_cpu_by_name():
    """FlexAttention has no backward on the CPU: a training call is refused as unavailable
    (torch's NotImplementedError came first), and a no-grad call still runs."""
    q, k, v = qkv(lq=8, lk=8)
    with torch.no_grad():
        assert rel_err(attention(q, k, v, backend="flex"), reference(q, k, v)) < 1e-5
    with pytest.raises(BackendUnavailable, match="no backward there"):
        attention(q.requires_grad_(), k, v, backend="flex")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_scores_that_fit_only_once_scaled_are_right_on_every_backend(backend):
    """The math backend scaled q.k after the product: in float16 q.k passed 65504 (inf),
    softmax made NaN and the NaN was zeroed as if the query saw no key."""
    q = torch.randn(1, 1, 4, 64, generator=torch.Generator().manual_seed(0)) * 40
    k, v = q + 0.1, torch.randn(1, 1, 4, 64, generator=torch.Generator().manual_seed(1))
    assert torch.isinf(q.half() @ k.half().transpose(-1, -2)).any()  # unscaled: overflows
    ref = reference(q, k, v)
    out = attention(q.half(), k.half(), v.half(), backend=backend)
    assert (out.double() - ref).abs().max() < 0.01


def test_causal_refuses_a_mask_and_more_queries_than_keys():
    q, k, v = qkv(lq=8, lk=4)
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        attention(q, k, v, causal=True)
    q, k, v = qkv(lq=4, lk=8)
    with pytest.raises(ValueError, match="causal=True takes no mask"):
        attention(q, k, v, mask=torch.ones(1, 1, 4, 8, dtype=torch.bool), causal=True)

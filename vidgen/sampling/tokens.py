"""Token sampling: temperature, top-k, top-p and classifier-free guidance on logits, drawing
from the stream's own generator. Pure functions over (..., vocab) logits."""

from __future__ import annotations

import torch

from vidgen.validate import check_int, values_checkable

GREEDY_BELOW = 1e-4  # temperatures this small sample the argmax (see sample_tokens)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the threshold are kept); others -inf.
    k = 0 (off) or >= vocab keeps everything."""
    if k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {k}")
    if k == 0 or k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability entries whose probability reaches p
    (nucleus sampling); others -inf. Entries tied with the least likely one kept are kept
    too (as ``top_k_filter`` keeps ties): which of equal logits a sort puts first is no
    reason to keep one and drop another. p = 1 keeps everything."""
    if not 0.0 < p <= 1.0:  # also NaN, which every comparison below would let through
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits = logits.sort(dim=-1, descending=True).values
    # In float32 at least: a bfloat16 running sum rounds at every entry and stopped short of
    # p (a kept mass of 0.893 for p = 0.9).
    probs = sorted_logits.float().softmax(dim=-1)
    # An entry is dropped when the mass before it already reaches p; the first never is (a
    # p that rounds to 0 in float32, below about 1e-45, would otherwise drop every entry).
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    least_kept = sorted_logits.masked_fill(drop_sorted, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < least_kept, float("-inf"))


def guide_logits(
    conditional: torch.Tensor, unconditional: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """Classifier-free guidance on logits: u + scale (c - u). A token masked out (-inf) in
    the conditional logits stays out (scale 0 gives the unconditional logits, as always); one
    masked out only in the unconditional logits keeps its conditional logit (``-inf - -inf``
    would otherwise make NaNs, which argmax takes for the largest value)."""
    c_out, u_out = torch.isneginf(conditional), torch.isneginf(unconditional)
    c, u = conditional.masked_fill(c_out, 0.0), unconditional.masked_fill(u_out, 0.0)
    guided = u + scale * (c - u)
    guided = torch.where(c_out & torch.as_tensor(scale != 0), float("-inf"), guided)
    # Out only in the unconditional logits: the conditional logit, except at scale 0, which
    # is the unconditional logits themselves.
    kept = torch.where(torch.as_tensor(scale != 0), conditional, float("-inf"))
    return torch.where(u_out, kept, guided)


def sample_tokens(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Sample one id per row of (..., vocab) logits; temperature 0 is greedy (argmax), and
    so is any below ``GREEDY_BELOW`` (dividing by it would overflow float32 logits)."""
    # Also NaN, which ``temperature < 0`` lets through, and infinity (or beyond float32's
    # range), which made every -inf logit NaN.
    if not 0 <= temperature <= torch.finfo(torch.float32).max:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    # Checked here, not only in the filters: the greedy path below calls none of them.
    check_int("top_k", top_k, minimum=0)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    # argmax takes NaN for the largest logit: a diverged model's greedy tokens were garbage
    # without a word (and multinomial's error named no argument).
    if values_checkable(logits) and torch.isnan(logits).any():
        raise ValueError("logits hold NaN (a diverged model or a NaN input): nothing to sample")
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    filtered = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = filtered.softmax(dim=-1).reshape(-1, logits.shape[-1])
    ids = torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)
    return ids.reshape(logits.shape[:-1])

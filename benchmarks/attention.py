"""Attention backends on block-causal training shapes and cached-inference shapes.

Usage: python benchmarks/attention.py [--device cpu|cuda] [--dtype float32|bfloat16]
                                      [--compile-cpu-flex] [--repeats N]

Training: forward + backward of one block-causal attention (NBP blocks of 16 tokens, clips
of 128 tokens), as `sdpa` with a dense boolean mask, `sdpa` unmasked (the ceiling), `flex`
with a BlockMask (compiled on CUDA, eager on CPU unless --compile-cpu-flex), `math`, and
`xformers` where it loads. FlexAttention has no CPU backward, so on CPU it is timed forward
only; every variant is also timed forward only so ratios compare like with like. Cached
inference: one new clip's queries against a full window (no mask: fused kernel) and against a
half-filled one (key-padding mask).

Prints one JSON object last: per-variant milliseconds, TFLOP/s on CUDA, and ratios in the same
run (`flex_vs_dense_mask` = dense-mask time / flex time, so > 1 means flex is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import _args
import torch

from vidgen.machine import cpu_model, describe_machine
from vidgen.nn import (
    attention,
    available_backends,
    block_causal_mask,
    key_padding_mask,
)

SHAPES = {
    # batch, heads, sequence, head_dim; the cached query is one clip against a 3-clip window
    "cpu": {"b": 2, "h": 4, "l": 768, "d": 32, "block": 16, "clip": 128, "window": 384},
    "cuda": {"b": 8, "h": 16, "l": 4096, "d": 64, "block": 16, "clip": 128, "window": 384},
}


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` after two warm-up calls (compilation happens there)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def train_step(q, k, v, mask, backend: str) -> Callable[[], None]:
    def step() -> None:
        out = attention(q, k, v, mask=mask, backend=backend)
        out.backward(torch.ones_like(out))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", type=_args.device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="float32 (CPU default) or bfloat16"
    )
    parser.add_argument("--repeats", type=_args.positive_int, default=None)
    parser.add_argument("--compile-cpu-flex", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    torch.manual_seed(0)
    b, h, seq, d = shape["b"], shape["h"], shape["l"], shape["d"]

    def tensor(*size: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype, requires_grad=grad)

    q, k, v = (tensor(b, h, seq, d, grad=True) for _ in range(3))
    dense = block_causal_mask(seq, shape["block"], device=device)
    flex_mask = block_causal_mask(seq, shape["block"], device=device, flex=True)
    backends = available_backends(device)
    cpu_flex = None
    if device.type == "cpu" and args.compile_cpu_flex:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        # FlexAttention has no CPU backward, compiled or not: forward only.
        cpu_flex = lambda: compiled(q.detach(), k.detach(), v.detach(), block_mask=flex_mask)  # noqa: E731

    # Forward + backward where the backend can (FlexAttention has no CPU backward), and
    # forward alone for every variant so ratios always compare like with like.
    variants = {
        "sdpa_unmasked": (None, "sdpa"),
        "sdpa_dense_mask": (dense, "sdpa"),
        "math_dense_mask": (dense, "math"),
    }
    if "flex" in backends:
        variants["flex_block_mask"] = (flex_mask, "flex")
    if "xformers" in backends:
        variants["xformers_dense_mask"] = (dense, "xformers")
    train: dict[str, float] = {}
    forward: dict[str, float] = {}
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    # Before any speed is compared, every masked variant must compute what the math backend
    # does with the dense mask (the flex variant as it is timed: compiled when it will be).
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    agreement: dict[str, float] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = attention(qd, kd, vd, mask=dense, backend="math").float()
        for name, (mask, backend) in variants.items():
            if mask is None:
                continue
            if name == "flex_block_mask" and cpu_flex is not None:
                out = cpu_flex()
            else:
                out = attention(qd, kd, vd, mask=mask, backend=backend)
            agreement[name] = float((out.float() - reference).abs().max())
            if agreement[name] > tol:
                raise RuntimeError(
                    f"{name} differs from the math backend by {agreement[name]:.3g} (> {tol}): "
                    "its speed would not be comparable"
                )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (mask, backend) in variants.items():
            if not (backend == "flex" and device.type == "cpu"):
                train[name] = timed(train_step(q, k, v, mask, backend), device, repeats)
            if name == "flex_block_mask" and cpu_flex is not None:
                forward[name] = timed(cpu_flex, device, repeats)
                continue
            with torch.no_grad():
                forward[name] = timed(
                    lambda m=mask, bk=backend: attention(qd, kd, vd, mask=m, backend=bk),
                    device,
                    repeats,
                )

    # Cached inference: one clip of queries against window + itself.
    kv_len = shape["window"] + shape["clip"]
    qc = tensor(b, h, shape["clip"], d)
    kc, vc = tensor(b, h, kv_len, d), tensor(b, h, kv_len, d)
    half = key_padding_mask([kv_len] * (b - 1) + [kv_len // 2], kv_len, device=device)
    with torch.no_grad():
        # The padded read, too, must compute what the math backend does with that mask.
        padded = attention(qc, kc, vc, half).float()
        diff = float((padded - attention(qc, kc, vc, half, backend="math").float()).abs().max())
        agreement["sdpa_padding_mask"] = diff
        if diff > tol:
            raise RuntimeError(f"sdpa_padding_mask differs from the math backend by {diff:.3g}")
        cached = {
            "sdpa_full_window": timed(lambda: attention(qc, kc, vc), device, repeats * 4),
            "sdpa_padding_mask": timed(lambda: attention(qc, kc, vc, half), device, repeats * 4),
        }
        if "xformers" in backends:
            cached["xformers_full_window"] = timed(
                lambda: attention(qc, kc, vc, backend="xformers"), device, repeats * 4
            )

    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "machine": describe_machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "backends": backends,
        "train_shape": {k_: shape[k_] for k_ in ("b", "h", "l", "d", "block")},
        "train_ms": {k_: round(v_, 3) for k_, v_ in train.items()},
        "forward_ms": {k_: round(v_, 3) for k_, v_ in forward.items()},
        "cached_ms": {k_: round(v_, 4) for k_, v_ in cached.items()},
        "max_abs_diff_vs_math": {k_: float(f"{v_:.3g}") for k_, v_ in agreement.items()},
        "dense_mask_vs_unmasked": round(forward["sdpa_dense_mask"] / forward["sdpa_unmasked"], 3),
        "cached_padding_vs_full": round(
            cached["sdpa_padding_mask"] / cached["sdpa_full_window"], 3
        ),
        "flex_compiled": device.type == "cuda" or args.compile_cpu_flex,
    }
    if "flex_block_mask" in forward:
        basis = train if "flex_block_mask" in train else forward
        result["flex_vs_dense_mask"] = round(basis["sdpa_dense_mask"] / basis["flex_block_mask"], 3)
        result["flex_vs_dense_mask_basis"] = "forward+backward" if basis is train else "forward"
    if device.type == "cuda":
        # fwd + bwd of attention = 3.5x the forward's 4*b*h*l^2*d; causal work is about half.
        flops = 3.5 * 4 * b * h * seq * seq * d
        result["train_tflops"] = {
            k_: round(flops * (1.0 if k_ == "sdpa_unmasked" else 0.5) / (ms * 1e-3) / 1e12, 1)
            for k_, ms in train.items()
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

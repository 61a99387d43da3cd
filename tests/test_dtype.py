"""Generators in bfloat16 (``dtype``): networks and cache in it, the truth in float32 or ids,
the contract kept within a dtype, and renders that never mix two dtypes in one video."""

import dataclasses

import numpy as np
import pytest
import torch

from tests.models import save_test_generators
from tests.test_generator_contract import FAMILIES, make_generator, request_for
from tests.test_orchestrator import render_until_a_segment
from vidgen.generators import (
    DiffusionClipGenerator,
    TokenClipGenerator,
    check_dtype,
    generate_video,
    load_generator,
)
from vidgen.models.ca2vdm import CA2VDM_CONFIGS, CausalVideoDiT
from vidgen.models.nbp import NBP_CONFIGS, NextBlockTransformer
from vidgen.nn import randomize_
from vidgen.render_config import RenderConfig
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder
from vidgen.tokenizers.larp import LARP_CONFIGS, LARPTokenizer, LARPVideoTokenizer
from workers.actor import GeneratorWorker
from workers.executors import LocalExecutor
from workers.orchestrator import Orchestrator
from workers.render import finished_render, parts_folder, render


def in_bfloat16(gen):
    """The same generator (same weights) with its networks and cache in bfloat16."""
    if isinstance(gen, DiffusionClipGenerator):
        other = DiffusionClipGenerator(gen.model, gen.autoencoder, max_streams=4, dtype="bfloat16")
    else:
        other = TokenClipGenerator(gen.model, gen.tokenizer, 4, dtype="bfloat16")
    other.test_reencode = getattr(gen, "test_reencode", False)
    return other


def run(gen, req, after: int | None = None):
    """The clips of ``req``; with ``after``, a snapshot then, with one clip more pending."""
    stream, out, snap = gen.open(req), [], None
    while not stream.done:
        (clip,) = gen.step([stream])
        out.append(clip.data)
        if after is not None and len(out) == after + 1:
            snap.add(clip)
        if after is not None and len(out) == after:
            snap = gen.snapshot(stream)
    gen.close(stream)
    return torch.stack(out), snap


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bfloat16_generator_keeps_the_contract(family):
    full = make_generator(family)
    half = in_bfloat16(make_generator(family))
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert half.cache.k.dtype == torch.bfloat16
    assert half.cache.spec.nbytes * 2 == full.cache.spec.nbytes
    context = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    req = request_for(half, context=context)
    clips, snap = run(half, req, after=2)
    again, _ = run(half, req)
    assert torch.equal(clips, again)  # deterministic
    # The truth is the float32 latents (or ids) whatever the dtype: restored on another
    # bfloat16 generator, the stream goes on bit for bit.
    assert clips.dtype == (torch.float32 if family == "diffusion" else torch.int64)
    other = in_bfloat16(make_generator(family))
    restored = other.restore(snap)
    assert restored.clip == 3 < restored.num_clips
    rest = [other.step([restored])[0].data for _ in range(restored.num_clips - restored.clip)]
    assert torch.equal(torch.stack(rest), clips[3:])
    frames = np.concatenate([c.frames for c in generate_video(half, req)])
    assert frames.dtype == np.uint8 and frames.std() > 1.0
    # A bfloat16 cache does not go into a float32 generator: refused by name.
    with pytest.raises(ValueError, match="snapshot k must be torch.float32"):
        make_generator(family).restore(snap)


def test_bfloat16_latents_follow_the_float32_ones():
    full = make_generator("diffusion")
    half = in_bfloat16(make_generator("diffusion"))
    req = request_for(full, frames=2 * full.clip_len)
    a, _ = run(full, req)
    b, _ = run(half, req)
    assert a.std() > 0.1
    # Rounding to 8 mantissa bits, not another model: close in every clip.
    assert (a - b).abs().mean() < 0.05 * a.abs().mean(), float((a - b).abs().mean())


def test_continuous_actions_run_in_bfloat16():
    """float32 actions met bfloat16 weights (and NBP's float32 zeros promoted its inputs)."""
    autoencoder = randomize_(KLAutoencoder(KL_CONFIGS["test"]), seed=2, std=0.1)
    dit_cfg = dataclasses.replace(CA2VDM_CONFIGS["test"], num_actions=0, action_dim=2)
    dit = randomize_(CausalVideoDiT(dit_cfg), seed=1)
    nbp_cfg = dataclasses.replace(NBP_CONFIGS["test"], num_actions=0, action_dim=2)
    nbp = randomize_(NextBlockTransformer(nbp_cfg), seed=1)
    larp = randomize_(LARPTokenizer(LARP_CONFIGS["test"]), seed=3, std=0.1)
    gens = [
        DiffusionClipGenerator(dit, autoencoder, dtype="bfloat16"),
        TokenClipGenerator(nbp, LARPVideoTokenizer(larp, autoencoder), dtype="bfloat16"),
    ]
    for gen in gens:
        actions = np.random.default_rng(1).normal(size=(2 * gen.clip_len, 2))
        req = request_for(gen, frames=2 * gen.clip_len, label=2, actions=actions)
        clips, _ = run(gen, req)
        req = request_for(gen, frames=2 * gen.clip_len, label=2, actions=-actions)
        assert not torch.equal(clips, run(gen, req)[0])  # the actions are read


@pytest.mark.parametrize("bad", ["float16", "fp32", "half", torch.float16, 32, None])
def test_other_dtypes_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float32'\]"):
        check_dtype(bad)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_generator("no-such-model", dtype=bad)  # named before any file is read
    with pytest.raises(ValueError, match="dtype must be one of"):
        RenderConfig(dtype=bad)
    assert check_dtype("bfloat16") is torch.bfloat16 and check_dtype(torch.float32) is torch.float32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return save_test_generators(tmp_path_factory.mktemp("models"))


def local(model: str, dtype: str = "float32", name: str = "local") -> LocalExecutor:
    return LocalExecutor(GeneratorWorker(model, max_streams=2, dtype=dtype), name)


def test_executors_of_two_dtypes_never_serve_one_orchestrator(models, caplog):
    model = models["diffusion"]
    with pytest.raises(ValueError, match=r"executors 0 and 1 would make different frames.*dtype"):
        Orchestrator([local(model), local(model, "bfloat16")])
    # A replacement in another dtype is not used: the stream waits for the executor left.
    first, second = local(model, "bfloat16", "a"), local(model, "bfloat16", "b")

    class Dies(FailsSecondStep):
        def recover(self):
            raise RuntimeError("gone")

    dying = Dies(first.worker, first.name)
    replaced = []

    def replace(failed):
        replaced.append(local(model, "float32", "c"))
        return replaced[-1]

    orch = Orchestrator([dying, second], replace=replace)
    req = request_for(make_generator("diffusion"), model=model, frames=32, steps=2)
    key = orch.submit(req)
    frames = np.concatenate([c.frames for c in orch.clips(key)])
    assert replaced and orch.executors[0] is None  # replaced by nothing: it was float32
    assert "differs in ['dtype']" in caplog.text
    gen = load_generator(model, max_streams=1, dtype="bfloat16")
    alone = np.concatenate([c.frames for c in generate_video(gen, req)])
    assert np.array_equal(frames, alone)


class FailsSecondStep(LocalExecutor):
    """Its second step fails as a killed actor's would (its streams gone with it)."""

    calls = 0

    def step(self, keys, epochs, snapshot_keys):
        self.calls += 1
        if self.calls == 2:
            self.worker.streams.clear()
            return self._call(_fail)
        return super().step(keys, epochs, snapshot_keys)


def _fail():
    from workers.executors import ExecutorFailed

    raise ExecutorFailed("killed")


def test_a_render_resumes_only_in_its_own_dtype(models, tmp_path):
    model = models["tokens"]
    req = request_for(make_generator("tokens"), model=model, frames=32, guidance=2.0)
    out = tmp_path / "video.mp4"
    orch = Orchestrator([local(model, "bfloat16")])
    result = render(orch, req, out, segment_clips=1)
    assert result.provenance["dtype"] == "bfloat16"
    sha = orch.info["sha256"]
    tok = orch.info["tokenizer_sha256"]
    assert finished_render(out, req, sha, False, tok, "bfloat16") is not None
    assert finished_render(out, req, sha, False, tok, "float32") is None
    # A parts folder made in one dtype (a render stopped after its first segment) is
    # refused by a render in the other.
    stopped = tmp_path / "stopped.mp4"
    render_until_a_segment(Orchestrator([local(model, "bfloat16")]), req, stopped)
    with pytest.raises(ValueError, match="made in bfloat16, this one runs in float32"):
        render(Orchestrator([local(model)]), req, stopped, segment_clips=1)
    # A folder from before the guard (no dtype file) was made in float32.
    (parts_folder(stopped) / "dtype").unlink()
    with pytest.raises(ValueError, match="made in float32, this one runs in bfloat16"):
        render(Orchestrator([local(model, "bfloat16")]), req, stopped, segment_clips=1)


def test_a_ray_executors_replacement_keeps_its_dtype(monkeypatch):
    import workers.executors

    started = []

    def fake_start(model, max_streams, threads, max_restarts, timeout, dtype="float32"):
        started.append(dtype)
        return object(), {"pid": len(started), "dtype": dtype}

    monkeypatch.setattr(workers.executors, "start_actor", fake_start)
    monkeypatch.setattr(workers.executors.RayExecutor, "retire", lambda self: None)
    executor = workers.executors.RayExecutor("m", dtype=torch.bfloat16)
    assert executor.replacement().info["dtype"] == "bfloat16"
    assert started == ["bfloat16", "bfloat16"]
    with pytest.raises(ValueError, match="dtype must be one of"):
        workers.executors.RayExecutor("m", dtype="float16")  # before any actor starts
    assert len(started) == 2


def test_a_torch_dtype_is_reported_by_name(models, tmp_path):
    """torch.bfloat16 passed to a worker made its info compare unequal to the name and broke
    the render guard (not a string)."""
    model = models["diffusion"]
    a = LocalExecutor(GeneratorWorker(model, max_streams=2, dtype=torch.bfloat16), "a")
    b = local(model, "bfloat16", "b")
    assert a.info["dtype"] == "bfloat16"
    orch = Orchestrator([a, b])
    req = request_for(make_generator("diffusion"), model=model, frames=8, steps=2)
    assert render(orch, req, tmp_path / "v.mp4").provenance["dtype"] == "bfloat16"


def test_an_executor_that_comes_back_different_is_not_used(models, caplog):
    """Restarted on a file replaced in place (other weights), an actor would have gone on
    making the stream's clips with them."""
    model = models["diffusion"]

    class ComesBackChanged(FailsSecondStep):
        retired = False

        def recover(self):
            self.info = {**self.info, "sha256": "f" * 64}

        def retire(self):
            self.retired = True

    changed = ComesBackChanged(GeneratorWorker(model, max_streams=2), "changed")
    orch = Orchestrator([changed, local(model, name="other")])
    req = request_for(make_generator("diffusion"), model=model, frames=32, steps=2)
    key = orch.submit(req)
    frames = np.concatenate([c.frames for c in orch.clips(key)])
    assert changed.retired and orch.executors[0] is None
    assert "came back different" in caplog.text and "sha256" in caplog.text
    alone = np.concatenate([c.frames for c in generate_video(load_generator(model, 1), req)])
    assert np.array_equal(frames, alone)


def test_a_batch_frees_executors_its_orchestrator_refuses(models, tmp_path):
    import json

    from workers.jobs.render import parse_manifest, run_batch

    model = models["diffusion"]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps({"id": "a", "model": model, "frames": 8}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    pool = [local(model), local(model, "bfloat16")]
    released = []
    rows = run_batch(
        parse_manifest(manifest, out, 100), out, lambda m: pool, release=released.append
    )
    assert released == [pool]
    assert rows[0]["status"] == "error" and "differ in ['dtype']" in rows[0]["error"]

"""The training loop: N steps in one run equal N/2, resume, N/2 — bitwise on CPU."""

import dataclasses
import re
import shutil

import numpy as np
import pytest
import torch

from vidgen import checkpoint
from vidgen.config import load_config
from vidgen.nn import randomize_
from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder, KLConfig
from vidgen.tokenizers.larp import LARPTokenizer, LARPVideoTokenizer
from vidgen.train import StepSampler, TrainingDiverged, TrainSetupError, lr_at, run_train
from vidgen.train.loop import TrainConfig, setting_changes

SMALL_BOUNCING = [
    "data=bouncing",
    "data.size=32",
    "data.bouncing.min_radius=3",
    "data.bouncing.max_radius=5",
    "data.batch_size=2",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.ckpt_every=2",
    "train.warmup=2",
]


def train(overrides: list[str], out, steps: int, stop_at: int = 0):
    cfg = load_config(
        "train", [*overrides, f"train.steps={steps}", f"train.stop_at={stop_at}", f"out={out}"]
    )
    cfg.name = "model"
    return run_train(cfg)


def tensors(path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path).tensors


def assert_bitwise_resume(overrides: list[str], tmp_path, steps: int = 4) -> None:
    straight = train(overrides, tmp_path / "straight", steps)
    halfway = train(overrides, tmp_path / "resumed", steps, stop_at=steps // 2)
    assert halfway.name == "state.safetensors"  # interrupted: nothing exported yet
    resumed = train(overrides, tmp_path / "resumed", steps)
    a, b = tensors(straight), tensors(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_a = tensors(tmp_path / "straight" / "state.safetensors")
    state_b = tensors(tmp_path / "resumed" / "state.safetensors")
    for name in state_a:  # optimizer moments and RNG state too
        assert torch.equal(state_a[name], state_b[name]), name
    # The card's history spans both runs of the resumed one, as the straight run's does.
    history = [checkpoint.load(p).card["history"] for p in (straight, resumed)]
    assert history[0] == history[1] and history[0][0]["step"] == 1
    # The run really trained: the weights moved from their initial values (lr 0: a LARP
    # still ends its VQ warm-up, which a run shorter than it is refused for).
    fresh = train([*overrides, "train.lr=0"], tmp_path / "zero", steps)
    assert any(not torch.equal(a[n], tensors(fresh)[n]) for n in a)


def test_kl_resume_is_bitwise(tmp_path):
    assert_bitwise_resume(["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"], tmp_path)


def test_a_diverging_run_stops_before_its_nan_update_and_keeps_the_last_state(tmp_path):
    """Nothing checked the loss: a run that diverged saved NaN weights over its only resume
    point every ckpt_every steps and exported them (the KL's latent scale then failed with a
    traceback)."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.threads=1"]
    sane = [*kl, "train.lr=1e-3", "train.warmup=0", "train.grad_clip=0"]
    train(sane, tmp_path / "run", 12, stop_at=2)
    saved = tensors(tmp_path / "run" / "state.safetensors")
    with pytest.raises(TrainingDiverged, match=r"at step \d+ is (nan|inf).*lower train.lr"):
        train([*sane, "train.lr=1e6"], tmp_path / "run", 12)  # diverges within 10 steps
    assert not (tmp_path / "run" / "model.safetensors").exists()
    state = checkpoint.load(tmp_path / "run" / "state.safetensors")
    for name, t in state.tensors.items():
        assert not t.is_floating_point() or bool(torch.isfinite(t).all()), name
    # The saved state is a good resume point: the run at its lr goes on from it.
    assert state.card["step"] >= 2
    if state.card["step"] == 2:
        assert all(torch.equal(saved[n], state.tensors[n]) for n in saved)
    path = train(sane, tmp_path / "run", 12)
    assert checkpoint.load(path).card["resumes"][-1]["step"] == state.card["step"]


def test_kl_decoder_fine_tuning_keeps_the_encoder_and_its_latent_scale(tmp_path):
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    base = checkpoint.load(train(kl, tmp_path / "base", 2))
    tuned = checkpoint.load(
        train([*kl, f"init={base.path}", "freeze=[encoder]"], tmp_path / "tuned", 3)
    )
    assert tuned.config["scale"] == base.config["scale"] != 1.0
    encoder = [n for n in base.tensors if n.startswith("encoder.")]
    decoder = [n for n in base.tensors if n.startswith("decoder.")]
    assert encoder and decoder
    assert all(torch.equal(base.tensors[n], tuned.tensors[n]) for n in encoder)
    assert any(not torch.equal(base.tensors[n], tuned.tensors[n]) for n in decoder)
    assert str(base.path) in tuned.card["init"]
    # It measures nothing on held-out clips, so it needs none (it was refused for it).
    frozen = [*kl, f"init={base.path}", "freeze=[encoder]", "data.eval_clips=0"]
    blind = checkpoint.load(train(frozen, tmp_path / "blind", 2))
    assert blind.config["scale"] == base.config["scale"]
    # Without the freeze the encoder trains too and the scale is measured again.
    free = checkpoint.load(train([*kl, f"init={base.path}"], tmp_path / "free", 3))
    assert any(not torch.equal(base.tensors[n], free.tensors[n]) for n in encoder)
    assert free.config["scale"] != base.config["scale"]
    # Part of the encoder frozen is refused (test_a_kl_freeze_must_cover_all_or_none_...).


def test_a_resumed_fine_tune_needs_only_its_state_not_its_init_file(tmp_path):
    """A fine-tune resumed after its init file was replaced in place (other weights, another
    latent scale) or removed equals the run made straight through: the state stands in for
    the init, and the card names the init the run began from."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    base = train(kl, tmp_path / "base", 2)
    other = checkpoint.load(train([*kl, "train.seed=1"], tmp_path / "other", 2))
    init = tmp_path / "init.safetensors"
    shutil.copy(base, init)
    tuned = [*kl, f"init={init}", "freeze=[encoder]"]
    straight = checkpoint.load(train(tuned, tmp_path / "straight", 4))
    assert other.config["scale"] != straight.config["scale"]

    def check(resumed: checkpoint.Checkpoint) -> None:
        assert resumed.config == straight.config  # the scale of the init it began from
        for key in ("init", "frozen"):
            assert resumed.card[key] == straight.card[key]
        assert resumed.card["resumes"] == [{"step": 2, "changes": {}}]
        assert resumed.tensors.keys() == straight.tensors.keys()
        for name in straight.tensors:
            assert torch.equal(resumed.tensors[name], straight.tensors[name]), name

    train(tuned, tmp_path / "swapped", 4, stop_at=2)
    shutil.copy(other.path, init)
    check(checkpoint.load(train(tuned, tmp_path / "swapped", 4)))
    shutil.copy(base, init)
    train(tuned, tmp_path / "gone", 4, stop_at=2)
    init.unlink()
    check(checkpoint.load(train(tuned, tmp_path / "gone", 4)))
    # A fresh run (no state) still needs the file.
    with pytest.raises(TrainSetupError, match="init"):
        train(tuned, tmp_path / "fresh", 4)
    # In the folder of a plain run: its state was loaded over the init, and the "fine-tune"
    # went on from that run's weights and step under a card naming the init.
    shutil.copy(base, init)
    with pytest.raises(TrainSetupError, match="did not start from an init"):
        train(tuned, tmp_path / "base", 4)


def test_fine_tuning_arguments_are_checked(tmp_path, monkeypatch):
    import vidgen.train as train_module

    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    base = train(kl, tmp_path / "base", 1)
    made = train_module._preset_task

    def unmade(cfg):  # a bad freeze was refused only after the data were made and encoded
        raise AssertionError("the task was made")

    monkeypatch.setattr(train_module, "_preset_task", unmade)
    with pytest.raises(ValueError, match="'encoders' names no parameter"):
        train([*kl, f"init={base}", "freeze=[encoders]"], tmp_path / "typo", 1)
    with pytest.raises(ValueError, match=r"fixes only part .* encoder\.body"):
        train([*kl, f"init={base}", "freeze=[encoder.conv_in]"], tmp_path / "part", 1)
    monkeypatch.setattr(train_module, "_preset_task", made)
    with pytest.raises(ValueError, match="latent_noise is for fine-tuning a decoder"):
        train([*kl, f"init={base}", "tokenizer.latent_noise=0.2"], tmp_path / "noise", 1)
    with pytest.raises(ValueError, match="freeze needs init"):
        train([*kl, "freeze=[encoder]"], tmp_path / "no-init", 1)
    with pytest.raises(TrainSetupError, match="shape"):  # another architecture: exit 2
        train([*kl, f"init={base}", "tokenizer.latent_channels=8"], tmp_path / "other", 1)


def test_larp_resume_is_bitwise_with_code_restarts(tmp_path):
    overrides = [
        "tokenizer=larp-test",
        f"tokenizer.autoencoder={make_autoencoder(tmp_path)}",
        "tokenizer.vq_warmup=2",  # the codebook is initialised mid-run
        "tokenizer.restart_every=1",
        *SMALL_BOUNCING,
        "data.clip_len=4",
        "data.num_clips=8",
        "data.eval_clips=2",
        "train.ema_decay=0",
    ]
    assert_bitwise_resume(overrides, tmp_path)


LARP_GAN = [
    "tokenizer=larp-test",
    *SMALL_BOUNCING,
    "data.clip_len=4",
    "data.num_clips=8",
    "data.eval_clips=2",
    "train.ema_decay=0",
    "tokenizer.gan_weight=0.5",
    "tokenizer.disc_dim=8",
    "tokenizer.disc_layers=2",
]


def test_larp_with_patch_gan_resumes_bitwise(tmp_path):
    # The discriminator starts at step 1 and the run is cut at step 2: its weights and Adam
    # moments must survive the resume like the model's.
    overrides = [*LARP_GAN, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    assert_bitwise_resume([*overrides, "tokenizer.gan_start=1"], tmp_path)
    state = tensors(tmp_path / "straight" / "state.safetensors")
    assert any(k.startswith("adv.") for k in state) and any(
        k.startswith("adv_optim.") for k in state
    )
    exported = tensors(tmp_path / "straight" / "model.safetensors")
    assert not any(k.startswith(("adv", "net.")) for k in exported)  # the model ships alone


def test_a_diverging_discriminator_stops_before_its_update(tmp_path, monkeypatch):
    """Only the model's loss was checked: a NaN discriminator update on a checkpoint step was
    saved into the resume point, which then could not be resumed."""
    import vidgen.train.tokenizer as tokenizer_train

    overrides = [
        *LARP_GAN,
        f"tokenizer.autoencoder={make_autoencoder(tmp_path)}",
        "tokenizer.gan_start=0",
    ]
    real, calls = tokenizer_train.hinge_d_loss, []

    def diverging(*args):
        calls.append(1)
        return real(*args) * (float("inf") if len(calls) == 3 else 1.0)  # at step 3

    monkeypatch.setattr(tokenizer_train, "hinge_d_loss", diverging)
    with pytest.raises(TrainingDiverged, match=r"discriminator's loss at step 3 is inf"):
        train(overrides, tmp_path / "run", 6)
    state = checkpoint.load(tmp_path / "run" / "state.safetensors")
    assert state.card["step"] == 2
    assert all(
        bool(torch.isfinite(t).all()) for t in state.tensors.values() if t.is_floating_point()
    )
    monkeypatch.setattr(tokenizer_train, "hinge_d_loss", real)
    path = train(overrides, tmp_path / "run", 6)  # the resume point is good
    assert checkpoint.load(path).card["resumes"][-1]["step"] == 2


def test_patch_gan_is_off_before_gan_start_and_trains_both_sides_after(tmp_path):
    overrides = [*LARP_GAN, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]

    def state_after(steps: int, gan_start: int, name: str) -> dict[str, torch.Tensor]:
        train([*overrides, f"tokenizer.gan_start={gan_start}"], tmp_path / name, steps)
        return tensors(tmp_path / name / "state.safetensors")

    late = state_after(3, 100, "late")  # the GAN never starts within the run
    on = state_after(3, 2, "on")  # it starts at step 2 (the third step)
    before = state_after(2, 2, "before")  # stopped just before it starts
    adv = [k for k in late if k.startswith("adv.")]
    model = [k for k in late if k.startswith("model.")]
    assert adv and model
    # Two steps without the GAN: the same model as a run that never uses it, and an untouched
    # discriminator (no moments yet).
    short = state_after(2, 100, "short")
    assert all(torch.equal(before[k], short[k]) for k in model + adv)
    assert not any(k.startswith("adv_optim.") for k in before)
    # The third step trains the discriminator and adds the adversarial term to the model's
    # loss, so both differ from the run without a GAN.
    assert any(not torch.equal(on[k], late[k]) for k in adv)
    assert any(k.startswith("adv_optim.") for k in on)
    assert any(not torch.equal(on[k], late[k]) for k in model)


def make_autoencoder(tmp_path) -> str:
    kl_cfg: KLConfig = KL_CONFIGS["test"]
    model = randomize_(KLAutoencoder(kl_cfg), std=0.1)
    return str(checkpoint.save(tmp_path / "kl.safetensors", model, kl_cfg))


def test_ca2vdm_resume_is_bitwise(tmp_path, monkeypatch):
    kl = make_autoencoder(tmp_path)
    overrides = [
        "model=ca2vdm-test",
        *SMALL_BOUNCING,
        "data.clip_len=6",
        "data.num_clips=8",
        f"frozen_tokenizer={kl}",
        "model.num_actions=0",
    ]
    assert_bitwise_resume(overrides, tmp_path)  # sampling at step 2 leaves training as is
    from vidgen.io import read_video
    from vidgen.train.encoded import load_autoencoder

    # The card pins the latents it was trained on (checked when a generator loads).
    card = checkpoint.load(tmp_path / "straight" / "model.safetensors").card
    assert card["tokenizer"] == "../kl.safetensors"  # relative to the model's folder
    # ... so the generator loads from any working directory (a Ray job's, for one).
    from vidgen.generators import load_generator

    monkeypatch.chdir(tmp_path / "straight" / "samples")
    assert load_generator(str(tmp_path / "straight" / "model.safetensors")).clip_len > 0
    assert card["tokenizer_fingerprint"] == load_autoencoder(kl)[0].encoder_fingerprint()

    samples = sorted((tmp_path / "straight" / "samples").glob("step-*.mp4"))
    assert [p.name for p in samples] == ["step-000002.mp4", "step-000004.mp4"]
    video = read_video(samples[-1]).numpy()
    assert video.shape[0] % 4 == 0 and video.shape[2] in (32, 4 * 32)  # labels side by side
    assert video.std() > 1.0  # frames, not a blank file


def test_lr_schedule_and_sampler_are_pure_functions_of_the_step():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    a = StepSampler(10, 4, seed=0, start_step=0, steps=6)
    b = StepSampler(10, 4, seed=0, start_step=3, steps=6)
    assert list(a)[3:] == list(b)
    seen = [i for batch in list(a)[:5] for i in batch]  # 20 indices = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_samples_are_npy_where_pyav_is_missing(tmp_path, monkeypatch):
    """On a bare CUDA image (no PyAV) training still writes its samples: the same frames as
    a uint8 .npy, the frames the mp4 holds."""
    from vidgen.io import read_video
    from vidgen.io import video as video_module
    from vidgen.models.ca2vdm import CA2VDM_CONFIGS, CausalVideoDiT
    from vidgen.train.diffusion import SAMPLE_CLIPS, write_samples

    kl = KLAutoencoder(KL_CONFIGS["test"])
    randomize_(kl, std=0.1)
    cfg = CA2VDM_CONFIGS["test"]
    torch.manual_seed(0)
    model = randomize_(CausalVideoDiT(cfg), std=0.1).eval()
    mp4 = write_samples(model, kl, 3, tmp_path, steps=2)
    decoded = read_video(mp4).numpy().astype(float)
    monkeypatch.setattr(video_module, "av", None)
    npy = write_samples(model, kl, 3, tmp_path, steps=2)
    assert mp4.name == "step-000003.mp4" and npy.name == "step-000003.npy"
    frames = np.load(npy)
    size = kl.config.image_size
    assert frames.dtype == np.uint8
    assert frames.shape == (SAMPLE_CLIPS * cfg.clip_len, size, 4 * size, 3)  # labels 1-4
    # Same frames: h264 (chroma at half resolution) keeps the luma of these noisy frames.
    luma = decoded.mean(-1).ravel(), frames.astype(float).mean(-1).ravel()
    assert frames.std() > 1.0 and np.corrcoef(*luma)[0, 1] > 0.9
    assert sorted(p.name for p in npy.parent.iterdir()) == [mp4.name, npy.name]  # no temp left


def test_a_failed_preview_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    """Any error writing the samples ended the run (a GPU lane lost its model so): the run
    now logs it and trains and exports as without samples."""
    import vidgen.train.diffusion as diffusion_train

    def broken(*args, **kwargs):
        raise RuntimeError("a sampling bug (simulated)")

    monkeypatch.setattr(diffusion_train, "write_samples", broken)
    overrides = [
        "model=ca2vdm-test",
        *SMALL_BOUNCING,
        "data.clip_len=6",
        "data.num_clips=8",
        f"frozen_tokenizer={make_autoencoder(tmp_path)}",
        "model.num_actions=0",
    ]
    with caplog.at_level("ERROR", logger="vidgen.train.loop"):
        path = train(overrides, tmp_path / "run", 4)
    assert checkpoint.load(path).card["steps"] == 4
    assert "samples at step 2 failed; training goes on" in caplog.text
    assert "a sampling bug (simulated)" in caplog.text


def test_nbp_resume_is_bitwise_over_tokens_encoded_once(tmp_path):
    """model=nbp-*: clips tokenised once by the frozen LARP and cached beside the run (a
    resumed run reads the cache, the same tokens), and resume is bitwise."""
    from safetensors.torch import load_file

    from tests.models import save_test_generators

    save_test_generators(tmp_path / "models")
    overrides = [
        "model=nbp-test",
        *SMALL_BOUNCING,
        "data.clip_len=8",  # two 4-frame clips per sequence
        "data.num_clips=8",
        f"frozen_tokenizer={tmp_path / 'models' / 'larp-test.safetensors'}",
        "model.num_actions=0",
    ]
    assert_bitwise_resume(overrides, tmp_path)
    caches = {
        run: list((tmp_path / run).glob("tokens-*-8.safetensors"))
        for run in ("straight", "resumed")
    }
    assert all(len(files) == 1 for files in caches.values())
    a, b = (load_file(files[0]) for files in caches.values())
    assert torch.equal(a["tokens"], b["tokens"]) and a["tokens"].shape == (8, 16)
    assert int(a["tokens"].min()) >= 0 and int(a["tokens"].max()) < 64
    assert set(a["label"].tolist()) <= {1, 2, 3, 4}
    larp = LARPVideoTokenizer.from_pretrained(str(tmp_path / "models" / "larp-test.safetensors"))
    card = checkpoint.load(tmp_path / "straight" / "model.safetensors").card
    assert card["tokenizer_fingerprint"] == larp.encoder_fingerprint()


def test_both_generator_families_warn_of_sequences_too_short_for_their_window(tmp_path, caplog):
    """Every prefix length trains at once, so sequences shorter than window + clip never
    train a full window of context, which inference reads from the window's end on. The DiT
    warned; NBP trained on in silence (nbp-test: 4-frame clips, an 8-frame window)."""
    from tests.models import save_test_generators
    from vidgen.train import build_task

    save_test_generators(tmp_path / "models")
    larp = tmp_path / "models" / "larp-test.safetensors"
    runs = {
        "ca2vdm": ["model=ca2vdm-test", f"frozen_tokenizer={make_autoencoder(tmp_path)}"],
        "nbp": ["model=nbp-test", f"frozen_tokenizer={larp}", "model.num_actions=0"],
    }
    for family, model in runs.items():
        for clip_len, warned in ((4, True), (12, False)):
            cfg = load_config(
                "train",
                [
                    *model,
                    *SMALL_BOUNCING,
                    f"data.clip_len={clip_len}",
                    "data.num_clips=2",
                    f"out={tmp_path / family / str(clip_len)}",
                ],
            )
            cfg.name = "model"
            caplog.clear()
            with caplog.at_level("WARNING"):
                build_task(cfg)
            assert ("never train with a full window" in caplog.text) == warned, family


def test_encoded_clips_cache_is_keyed_by_the_data(tmp_path, monkeypatch, caplog):
    """Encoded training data is cached per (encoder, data settings): a run over other clips
    (clip length, size, seed, world settings) never reads another run's cache, and a file
    made from other data is refused rather than trained on."""
    import logging
    from dataclasses import replace

    from vidgen.data import DataConfig, build_dataset
    from vidgen.train import encoded
    from vidgen.train.encoded import EncodedClips, cache_path, data_description

    base = DataConfig(name="bouncing", clip_len=4, size=32, num_clips=3, eval_clips=2)
    path = cache_path(tmp_path, "latents", "ab" * 32, base, "train")
    assert path.name.startswith("latents-abababababab-train-") and path.name.endswith(
        "-3.safetensors"
    )
    for other in (
        replace(base, clip_len=8),
        replace(base, size=48),
        replace(base, seed=1),
        replace(base, name="mix"),
        replace(base, num_clips=4),
        replace(base, bouncing=replace(base.bouncing, max_shapes=2)),
    ):
        assert cache_path(tmp_path, "latents", "ab" * 32, other, "train") != path
    # Batching and the other split's settings do not change the clips.
    for same in (replace(base, batch_size=5, num_workers=1), replace(base, eval_clips=9)):
        assert cache_path(tmp_path, "latents", "ab" * 32, same, "train") == path
    assert cache_path(tmp_path, "latents", "ab" * 32, replace(base, num_clips=9), "eval") == (
        cache_path(tmp_path, "latents", "ab" * 32, base, "eval")
    )
    assert cache_path(tmp_path, "latents", "cd" * 32, base, "train") != path
    # Settings its source never reads do not change the clips: the cache is reused.
    key = lambda d: cache_path(tmp_path, "latents", "ab" * 32, d, "train")  # noqa: E731
    assert key(replace(base, agent_policy="push", agent_fraction=0.2)) == path
    mix = replace(base, name="mix")
    assert key(replace(mix, agent_fraction=0.2)) != key(mix)
    agent = replace(base, name="agent")
    assert key(replace(agent, bouncing=replace(base.bouncing, max_shapes=2))) == key(agent)
    assert key(replace(agent, agent_policy="push")) != key(agent)
    folder = DataConfig(name="folder", root=str(tmp_path), clip_len=4, size=32)
    assert key(replace(folder, seed=3, agent_fraction=0.1)) == key(folder)
    assert key(replace(folder, stride=2)) != key(folder)
    with pytest.raises(ValueError, match="split must be"):
        data_description(base, "test")

    calls = []

    def encode(video):
        calls.append(video.shape)
        return video.mean(dim=(2, 3, 4))

    desc = data_description(base, "train")
    # The progress bar is off when stderr is a file: a log line says what is encoded,
    # how far along (every PROGRESS_EVERY seconds; 0 here: every batch) and when it is done.
    monkeypatch.setattr(encoded, "PROGRESS_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger=encoded.__name__):
        first = EncodedClips(build_dataset(base), encode, path, description=desc, batch_size=2)
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("encoding 3 clips (latents) once") and str(path) in said[0]
    assert said[1:3] == ["encoding clips (latents): 2 of 3", "encoding clips (latents): 3 of 3"]
    assert said[3].startswith("encoded 3 clips in ")
    caplog.clear()
    again = EncodedClips(build_dataset(base), encode, path, description=desc)  # from the file
    assert len(calls) == 2 and len(again) == 3 and not caplog.records
    assert torch.equal(first.tensors["latents"], again.tensors["latents"])
    # The same file offered for other data (a renamed cache, or an older run's name): refused.
    longer = replace(base, clip_len=8)
    with pytest.raises(ValueError, match="holds 3 clips of .*delete it"):
        EncodedClips(
            build_dataset(longer), encode, path, description=data_description(longer, "train")
        )
    more = replace(base, num_clips=4)
    with pytest.raises(ValueError, match="holds 3 clips"):
        EncodedClips(build_dataset(more), encode, path, description=data_description(more, "train"))
    assert len(calls) == 2


LARP_SMALL = [
    "tokenizer=larp-test",
    *SMALL_BOUNCING,
    "data.clip_len=4",
    "data.num_clips=8",
    "data.eval_clips=2",
    "train.ema_decay=0",
    "tokenizer.vq_warmup=2",
]


def test_a_larp_names_its_autoencoder_relative_to_itself(tmp_path, monkeypatch):
    """The exported LARP named its autoencoder as given on the command line: a relative
    path loaded only from the folder training ran in (and its NBP with it)."""
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    larp = [o for o in larp if not o.startswith("data.eval_clips=")] + ["data.eval_clips=6"]
    path = train(larp, tmp_path / "runs" / "larp", 3)
    assert checkpoint.load(path).config["autoencoder"] == "../../kl.safetensors"
    # Only the held-out clips evaluation reads (train.eval_batches=1 batch of 2) are encoded
    # and kept with their videos, not all data.eval_clips (6).
    (cache,) = (tmp_path / "runs" / "larp").glob("latents+video*")
    assert checkpoint.load(cache).tensors["video"].shape[0] == 2
    monkeypatch.chdir(tmp_path / "runs")
    tokenizer = LARPVideoTokenizer.from_pretrained(str(path))
    assert tokenizer.autoencoder is not None and len(tokenizer.files) == 2


# All of a LARP's encoding path (a freeze of part of it is refused).
ENCODING = "encoder,patch_in,patch_pos,queries,to_code,quantizer"


def test_fine_tuning_a_larp_keeps_its_trained_codebook(tmp_path):
    """A model from ``init=`` is past its VQ warm-up: the warm-up's codebook init must not
    wipe its codes, and a frozen quantizer is not touched by dead-code restarts."""
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    base = train(larp, tmp_path / "base", 3)
    codes = tensors(base)["quantizer.codebook"]
    frozen = train(
        [*larp, f"init={base}", f"freeze=[{ENCODING}]", "tokenizer.restart_every=1"],
        tmp_path / "frozen",
        3,
    )
    assert torch.equal(tensors(frozen)["quantizer.codebook"], codes)
    tuned = train([*larp, f"init={base}", "tokenizer.restart_every=0"], tmp_path / "tuned", 3)
    moved = torch.nn.functional.cosine_similarity(tensors(tuned)["quantizer.codebook"], codes)
    assert moved.min() > 0.9  # nudged by gradients, not replaced by encoder outputs


def test_a_resumed_larp_fine_tune_is_past_its_vq_warm_up_without_its_init_file(tmp_path):
    """The resumed fine-tune's model starts from its state, quantizer switched on: a warm-up
    longer than the run (refused for a LARP that never quantised) is no reason to refuse it,
    and the result equals the run made straight through."""
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    init = tmp_path / "init.safetensors"
    shutil.copy(train(larp, tmp_path / "base", 3), init)
    tuned = [*larp, f"init={init}", "tokenizer.vq_warmup=100"]
    straight = tensors(train(tuned, tmp_path / "straight", 4))
    train(tuned, tmp_path / "resumed", 4, stop_at=2)
    init.unlink()
    resumed = tensors(train(tuned, tmp_path / "resumed", 4))
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)
    with pytest.raises(ValueError, match="vq_warmup=100 must be <= train.steps"):
        train([*larp, "tokenizer.vq_warmup=100"], tmp_path / "scratch", 4)  # no init: refused


def test_a_larp_freeze_must_cover_all_or_none_of_what_its_ids_depend_on(tmp_path):
    """``freeze=[encoder]`` on a LARP left its patch embedding, queries, projection and
    codebook training: new ids without a word, found only when its NBP was refused."""
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    base = train(larp, tmp_path / "base", 3)
    with pytest.raises(ValueError, match=r"fixes only part .* patch_in.*quantizer"):
        train([*larp, f"init={base}", "freeze=[encoder]"], tmp_path / "part", 1)
    tuned = tensors(train([*larp, f"init={base}", f"freeze=[{ENCODING}]"], tmp_path / "all", 2))
    encoding = [n for n in tuned if n.startswith(LARPTokenizer.ENCODER_TENSORS)]
    assert "quantizer.codebook" in encoding and "queries" in encoding
    assert all(torch.equal(tuned[n], tensors(base)[n]) for n in encoding)


def test_a_kl_freeze_must_cover_all_or_none_of_its_encoder(tmp_path):
    """Only a LARP named what its codes depend on: a KL fine-tune freezing part of its
    encoder trained the rest, and every model on its latents was refused only at load."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    base = train(kl, tmp_path / "base", 2)
    with pytest.raises(ValueError, match=r"fixes only part .* encoder\.body"):
        train([*kl, f"init={base}", "freeze=[encoder.conv_in]"], tmp_path / "part", 1)
    tuned = tensors(train([*kl, f"init={base}", "freeze=[encoder]"], tmp_path / "all", 1))
    assert all(torch.equal(tuned[n], tensors(base)[n]) for n in tuned if n.startswith("encoder."))


def test_a_larp_is_refused_with_an_autoencoder_it_was_not_trained_on(tmp_path):
    """The LARP loaded whatever autoencoder is now under its name: a retrained or replaced
    one turned the same frames into other ids without a word. Its card's fingerprint is
    checked, and the latents' shape against the LARP's."""
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    path = train(larp, tmp_path / "larp", 2)
    assert LARPVideoTokenizer.from_pretrained(str(path)).autoencoder is not None
    other = randomize_(KLAutoencoder(KL_CONFIGS["test"]), seed=5, std=0.1)
    checkpoint.save(tmp_path / "kl.safetensors", other, KL_CONFIGS["test"])
    with pytest.raises(checkpoint.CheckpointError, match="trained on the latents of an autoen"):
        LARPVideoTokenizer.from_pretrained(str(path))
    wide = dataclasses.replace(KL_CONFIGS["test"], latent_channels=8)
    checkpoint.save(tmp_path / "kl.safetensors", KLAutoencoder(wide), wide)
    checkpoint.update_card(path, {"autoencoder_fingerprint": None})  # as cards before it
    with pytest.raises(checkpoint.CheckpointError, match="latents of 8 channels .* reads 4"):
        LARPVideoTokenizer.from_pretrained(str(path))


def test_a_patch_gan_too_deep_for_the_frames_is_refused_at_setup(tmp_path):
    """It was found at gan_start, thousands of steps in, with the deeper discriminator's
    weights already in the state (a resume with fewer layers was then refused too)."""
    overrides = [*LARP_GAN, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    with pytest.raises(ValueError, match=r"disc_layers=6 stride-2 layers need frames of at "):
        train([*overrides, "tokenizer.disc_layers=6", "tokenizer.gan_start=50"], tmp_path, 1)
    assert not (tmp_path / "state.safetensors").exists()


def test_initial_weights_do_not_depend_on_an_existing_cache(tmp_path):
    """Encoding the training clips (first run) must not draw from the global RNG that the
    model's initial weights come from (a re-run finds the cache)."""
    from vidgen.train import build_task

    overrides = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    cfg = load_config("train", [*overrides, f"out={tmp_path / 'run'}"])
    cfg.name = "model"
    weights = []
    for _ in range(2):  # the first builds the cache, the second reads it
        torch.manual_seed(0)
        weights.append({k: v.clone() for k, v in build_task(cfg).model.state_dict().items()})
    assert len(list((tmp_path / "run").glob("latents-*-train-*.safetensors"))) == 1
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_a_larp_that_does_not_fit_its_autoencoder_is_refused_before_encoding(tmp_path):
    overrides = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    with pytest.raises(ValueError, match="latent channels and size of its autoencoder"):
        train([*overrides, "tokenizer.size=8"], tmp_path / "run", 1)
    assert not list((tmp_path / "run").glob("latents-*"))


def test_nbp_token_cache_is_keyed_by_the_larps_autoencoder_too(tmp_path):
    """The LARP loads its autoencoder by path: a changed autoencoder file changes every
    token, so the cached tokens of the old one must not be reused."""
    from tests.models import save_test_generators
    from vidgen.train import build_task

    models = tmp_path / "models"
    save_test_generators(models)
    overrides = [
        "model=nbp-test",
        *SMALL_BOUNCING,
        "data.clip_len=8",
        "data.num_clips=4",
        f"frozen_tokenizer={models / 'larp-test.safetensors'}",
        "model.num_actions=0",
        f"out={tmp_path / 'run'}",
    ]
    cfg = load_config("train", overrides)
    cfg.name = "model"
    build_task(cfg)
    kl_cfg = KL_CONFIGS["test"]
    other = randomize_(KLAutoencoder(kl_cfg), seed=5, std=0.1)
    checkpoint.save(models / "kl-test.safetensors", other, kl_cfg)
    build_task(cfg)
    for split in ("train", "eval"):  # the held-out tokens too
        assert len(list((tmp_path / "run").glob(f"tokens-*-{split}-*.safetensors"))) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.eval_every=0", "train.eval_every must be >= 1"),
        ("train.ckpt_every=0", "train.ckpt_every must be >= 1"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.eval_batches=-1", "train.eval_batches must be >= 0"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
        ("train.lr=-1e-3", "train.lr must be >= 0"),  # gradient ascent
        ("train.beta2=1", "train.beta2 must be in \\[0, 1\\)"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio must be in \\[0, 1\\]"),
        ("train.stop_at=-1", "train.stop_at must be >= 0"),
        ("train.warmup=-5", "train.warmup must be >= 0"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
        ("train.seed=-1", "train.seed must be >= 0"),
        # seed x 1,000,003 overflowed torch's generator seed at the first batch, after the
        # data was prepared (hours for a generator's encoded clips)
        ("train.seed=4294967296", "train.seed must be <= 4294967295"),
    ],
)
def test_bad_train_settings_are_refused(override, message):
    with pytest.raises(Exception, match=message):
        load_config("train", ["tokenizer=kl-test", override])


def test_a_train_out_under_home_is_expanded(monkeypatch, tmp_path):
    """out='~/runs/kl' trained into a folder named '~' in the working directory."""
    from vidgen.train import out_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("train", ["tokenizer=kl-test", "out='~/runs/kl'"])
    assert out_dir(cfg) == tmp_path / "runs" / "kl"


@pytest.mark.parametrize(
    "overrides, message",
    [
        # Each was accepted and failed later, naming nothing or something else.
        (["tokenizer=larp-test", "tokenizer.tau=0"], "tau must be > 0"),
        (["tokenizer=larp-test", "tokenizer.patch=0"], "patch must be >= 1"),
        (["tokenizer=larp-test", "tokenizer.restart_every=-1"], "restart_every must be >= 0"),
        (["tokenizer=larp-test", "tokenizer.usage_decay=1.5"], "usage_decay must be in"),
        (["tokenizer=kl-test", "tokenizer.scale=0"], "scale must be > 0"),
        (["tokenizer=kl-test", "tokenizer.kl_weight=-1"], "kl_weight must be >= 0"),
        (["model=ca2vdm-test", "model.window=0"], "window must be >= 1"),
        (["model=ca2vdm-test", "model.clip_len=0"], "clip_len must be >= 1"),
        (["model=ca2vdm-test", "model.prefix_t=1.5"], "prefix_t must be in"),
        (["model=ca2vdm-test", "model.label_dropout=1.5"], "label_dropout must be in"),
        (["model=nbp-test", "model.block=0"], "block must be >= 1"),
        (["model=nbp-test", "model.depth=0"], "depth must be >= 1"),
        (["model=nbp-test", "model.depth=513"], "depth must be <= 512 layers"),
        (["model=ca2vdm-test", "model.depth=10000"], "depth must be <= 512 layers"),
        (
            ["model=nbp-test", "model.num_actions=5", "model.action_dim=2"],
            "cannot both be > 0",
        ),
    ],
)
def test_bad_model_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(Exception, match=message):
        load_config("train", overrides)


def test_a_dit_that_does_not_fit_its_autoencoder_is_refused_before_encoding(tmp_path):
    kl = make_autoencoder(tmp_path)
    base = ["model=ca2vdm-test", *SMALL_BOUNCING, "data.clip_len=4", "data.num_clips=2"]
    for override in ("model.latent_channels=8", "model.latent_size=8"):
        with pytest.raises(TrainSetupError, match="model.latent_channels and model.latent_size"):
            train([*base, f"frozen_tokenizer={kl}", override], tmp_path / "run", 1)
    assert not list((tmp_path / "run").glob("latents-*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_actions=0", "model.action_dim=2"], r"action_dim=2 needs continuous"),
        (
            ["model.num_actions=0", "model.action_dim=3", "data.agent.continuous=true"],
            r"action_dim=3 needs continuous \(3,\) actions, but .* gives continuous \(2,\)",
        ),
        (["model.num_actions=5", "data.agent.continuous=true"], "num_actions=5 needs discrete"),
        (["model.num_actions=3", "data=agent"], r"num_actions=3 is fewer than the 5 actions"),
        # Labels past the model's classes trained as unconditional (the null label), unsaid.
        (
            ["data.bouncing.max_shapes=8"],
            r"num_classes=5 has labels 0..4, but data.bouncing.max_shapes=8 gives label 8",
        ),
        (
            ["data=mix", "data.bouncing.num_shapes=5"],
            r"data.bouncing.num_shapes=5 gives label 5 .* set model.num_classes=6",
        ),
    ],
)
def test_actions_the_data_cannot_give_are_refused_before_encoding(tmp_path, overrides, message):
    """A model's actions that the data does not give failed at the first step, after every
    clip was encoded, with a traceback from the conditioning layer."""
    kl = make_autoencoder(tmp_path)
    base = ["model=ca2vdm-test", *SMALL_BOUNCING, "data.clip_len=4", "data.num_clips=2"]
    with pytest.raises(TrainSetupError, match=message):
        train([*base, f"frozen_tokenizer={kl}", *overrides], tmp_path / "run", 1)
    assert not (tmp_path / "run").exists()  # refused before anything was made
    # Discrete actions on a world without any (zeros) are fine: the model sees noops.
    train([*base, f"frozen_tokenizer={kl}", "model.num_actions=3"], tmp_path / "ok", 1)


def test_an_nbp_whose_clips_are_not_the_tokenizers_is_refused(tmp_path):
    """A clip of 8 frames over a 4-frame LARP conditioned each token clip on the wrong
    frames' actions and sized the window wrongly, without a word."""
    from tests.models import save_test_generators

    models = tmp_path / "models"
    save_test_generators(models)
    overrides = [
        "model=nbp-test",
        *SMALL_BOUNCING,
        "data.clip_len=8",
        "data.num_clips=2",
        f"frozen_tokenizer={models / 'larp-test.safetensors'}",
        "model.frames_per_clip=8",
    ]
    with pytest.raises(TrainSetupError, match="model.frames_per_clip"):
        train(overrides, tmp_path / "run", 1)


def test_a_larp_run_that_would_end_in_its_vq_warm_up_is_refused(tmp_path):
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    with pytest.raises(TrainSetupError, match="tokenizer.vq_warmup=2 must be <= train.steps=1"):
        train(larp, tmp_path / "run", 1)
    exported = tensors(train(larp, tmp_path / "run", 2))  # quantises from its last step
    assert int(exported["quantizer.active"]) == 1


def test_grad_clip_zero_means_no_clipping(tmp_path):
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.ema_decay=0"]
    off = tensors(train([*kl, "train.grad_clip=0"], tmp_path / "off", 2))
    huge = tensors(train([*kl, "train.grad_clip=1e9"], tmp_path / "huge", 2))
    fresh = tensors(train([*kl, "train.lr=0"], tmp_path / "fresh", 1))
    for name in off:
        assert torch.equal(off[name], huge[name]), name
    assert any(not torch.equal(off[n], fresh[n]) for n in off)  # it trained


def test_kl_without_eval_batches_is_refused_before_it_trains(tmp_path):
    """It trained every step and failed only at export (and again on every re-run, its
    state being at the last step)."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.eval_batches=0"]
    with pytest.raises(TrainSetupError, match="train.eval_batches must be >= 1"):
        train(kl, tmp_path / "run", 1)
    assert not (tmp_path / "run" / "state.safetensors").exists()


def test_the_card_history_of_a_resumed_run_is_the_uninterrupted_ones(tmp_path):
    """A resumed run's first step entered the history off the log_every grid: steps
    [1, 2, 3, 4] against [1, 2, 4] for the same run uninterrupted."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.log_every=2"]
    straight = train(kl, tmp_path / "straight", 4)
    train(kl, tmp_path / "resumed", 4, stop_at=2)
    resumed = train(kl, tmp_path / "resumed", 4)
    logged = [
        [h["step"] for h in checkpoint.load(p).card["history"] if "loss" in h]
        for p in (straight, resumed)
    ]
    assert logged[0] == logged[1] == [1, 2, 4]


def test_a_larp_resumed_with_a_lower_vq_warmup_still_quantises(tmp_path):
    """Quantisation switched on only at step == vq_warmup: a resume past a lowered warm-up
    exported a tokenizer that never quantised."""
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    train([*larp, "tokenizer.vq_warmup=4"], tmp_path / "run", 6, stop_at=3)
    path = train([*larp, "tokenizer.vq_warmup=2"], tmp_path / "run", 6)
    assert int(tensors(path)["quantizer.active"]) == 1


def test_an_unreadable_frozen_tokenizer_is_a_setup_error_and_leaves_no_folder(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    gen = ["model=ca2vdm-test", *SMALL_BOUNCING, "data.clip_len=6", f"frozen_tokenizer={junk}"]
    with pytest.raises(TrainSetupError, match="junk.safetensors"):
        train(gen, tmp_path / "runs" / "gen", 1)
    assert not (tmp_path / "runs").exists()


def test_the_patch_gan_decodes_on_the_clips_device():
    """The frozen autoencoder lives outside the model (``.to(device)`` never reaches it):
    the GAN's decode moves it to the clips' device."""
    from vidgen.train.tokenizer import _frames

    kl_cfg = KL_CONFIGS["test"]
    autoencoder = KLAutoencoder(kl_cfg)
    clips = torch.zeros(1, 2, kl_cfg.latent_channels, 4, 4, device="meta")
    assert _frames(clips, autoencoder).device.type == "meta"


def test_folder_cache_is_keyed_by_the_files_and_hidden_files_are_skipped(tmp_path):
    import os

    from vidgen.data import DataConfig
    from vidgen.data.folder import VideoFolder
    from vidgen.io import VideoWriter
    from vidgen.train.encoded import data_description

    root = tmp_path / "videos"
    root.mkdir()

    def write(name: str, value: int) -> None:
        with VideoWriter(root / name) as writer:
            writer.write(np.full((8, 32, 32, 3), value, dtype=np.uint8))

    write("a.mp4", 10)
    write(".a.1234.tmp.mp4", 20)  # an unfinished write: not data
    (root / "._a.mp4").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata: not a video
    data = DataConfig(name="folder", root=str(root), clip_len=4, size=32)
    assert [p.name for p in VideoFolder(root, clip_len=4, size=32).files] == ["a.mp4"]
    before = data_description(data, "train")
    write("a.mp4", 200)  # same name and length, other frames
    os.utime(root / "a.mp4", ns=(1, 1))
    assert data_description(data, "train") != before


@pytest.mark.parametrize(
    "edit", [{"step": "x"}, {"step": -3}, {"param_groups": None}, {"param_groups": [{}]}]
)
def test_a_state_with_an_edited_card_is_refused_in_one_line(tmp_path, edit):
    """A state whose card was edited (its digest made again) failed with a KeyError or a
    torch RuntimeError from deep in the resume, or trained on from step -3."""
    run = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.threads=1"]
    train(run, tmp_path / "run", 4, stop_at=2)
    checkpoint.update_card(tmp_path / "run" / "state.safetensors", edit)
    with pytest.raises(TrainSetupError, match=r"the state in .* is damaged \("):
        train(run, tmp_path / "run", 4)


def test_a_state_with_nan_weights_is_refused_as_such_not_as_another_model(tmp_path):
    """It said the state did not fit this run's model, and to resume with its settings."""
    run = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.threads=1"]
    train(run, tmp_path / "run", 4, stop_at=2)
    path = tmp_path / "run" / "state.safetensors"
    state = checkpoint.load(path)
    tensors = dict(state.tensors)
    name = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    metadata = checkpoint._metadata(state.config_type, state.config, state.card)
    checkpoint._write(path, tensors, metadata)
    with pytest.raises(TrainSetupError, match=r"holds NaN or inf weights.*cannot be resumed"):
        train(run, tmp_path / "run", 4)


def test_a_resume_over_other_videos_is_recorded_as_a_change(tmp_path, caplog):
    """A folder run resumed after its videos changed went on silently over other data (its
    card's resumes said nothing changed)."""
    from vidgen.io import VideoWriter

    root = tmp_path / "videos"
    root.mkdir()

    def write(name: str, frames: int) -> None:
        with VideoWriter(root / name) as writer:
            writer.write(np.full((frames, 32, 32, 3), 90, dtype=np.uint8))

    write("a.mp4", 10)
    run = [
        "tokenizer=kl-test",
        "data=folder",
        f"data.root={root}",
        "data.size=32",
        "data.clip_len=2",
        "data.batch_size=2",
        "train.eval_batches=1",
        "train.ckpt_every=2",
        "train.threads=1",
    ]
    train(run, tmp_path / "same", 4, stop_at=2)
    unchanged = checkpoint.load(train(run, tmp_path / "same", 4)).card
    assert unchanged["resumes"] == [{"step": 2, "changes": {}}] and unchanged["data_files"]
    train(run, tmp_path / "run", 4, stop_at=2)
    write("b.mp4", 6)
    with caplog.at_level("WARNING"):
        card = checkpoint.load(train(run, tmp_path / "run", 4)).card
    (resume,) = card["resumes"]
    assert resume["changes"]["data.root videos"] == [unchanged["data_files"], card["data_files"]]
    assert "data.root videos" in caplog.text


def test_data_num_workers_loads_in_worker_processes_with_the_same_result(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    import vidgen.train.loop as loop

    used = []

    class Recording(DataLoader):
        def __init__(self, *args, **kwargs):
            used.append(kwargs.get("num_workers", 0))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loop, "DataLoader", Recording)
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.ema_decay=0"]
    two = tensors(train([*kl, "data.num_workers=2"], tmp_path / "two", 2))
    assert 2 in used
    none = tensors(train(kl, tmp_path / "none", 2))
    for name in two:
        assert torch.equal(two[name], none[name]), name


def test_the_ema_takes_the_codebooks_data_dependent_init_outright(tmp_path):
    """At the end of the VQ warm-up the codes jump onto encoder outputs: an EMA averaging
    towards them would keep mostly the random codes (and ship those)."""
    overrides = [
        *[o for o in LARP_SMALL if o != "train.ema_decay=0"],
        f"tokenizer.autoencoder={make_autoencoder(tmp_path)}",
        "train.ema_decay=0.999",
        "tokenizer.restart_every=0",
        "train.lr=0",  # nothing moves but the init: the EMA must equal the model
    ]
    train(overrides, tmp_path / "run", 2)
    state = tensors(tmp_path / "run" / "state.safetensors")
    assert int(state["model.quantizer.active"]) == 1
    assert torch.equal(state["ema.quantizer.codebook"], state["model.quantizer.codebook"])


def test_max_seconds_exports_the_model_as_it_is_and_resumes(tmp_path):
    """train.max_seconds: the invocation stops once it has trained that long, saves its state
    and exports (the card says the step reached); running again resumes to the end."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    boxed = load_config(
        "train", [*kl, "train.steps=4", "train.max_seconds=1e-9", "out=" + str(tmp_path)]
    )
    boxed.name = "model"
    # What a run killed while saving leaves behind: removed when the run starts again.
    (tmp_path / "samples").mkdir()
    stale = [
        tmp_path / ".state.0a1b2c3d.tmp",
        tmp_path / "samples" / ".step-000004.0a1b2c3d.tmp.mp4",
    ]
    for path in stale:
        path.write_bytes(b"half a file")
    path = run_train(boxed)
    assert not any(p.exists() for p in stale)
    assert path.name == "model.safetensors"
    assert checkpoint.load(path).card["steps"] == 1
    assert checkpoint.load(tmp_path / "state.safetensors").card["step"] == 1
    final = train(kl, tmp_path, 4)  # no time box: resumes at step 1
    assert checkpoint.load(final).card["steps"] == 4
    straight = train(kl, tmp_path / "straight", 4)
    a, b = tensors(final), tensors(straight)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the box changed nothing but the stop
    with pytest.raises(ValueError, match="max_seconds"):
        TrainConfig(max_seconds=-1)


def test_a_resume_with_changed_settings_says_so_and_the_card_records_it(tmp_path, caplog):
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    train(kl, tmp_path, 4, stop_at=1)
    train(kl, tmp_path, 4, stop_at=2)  # only the invocation's stop changed: no warning
    assert "changed" not in caplog.text
    with caplog.at_level("WARNING"):
        final = train([*kl, "train.lr=5e-4", "tokenizer.grad_weight=0.25"], tmp_path, 6)
    assert "train.lr 0.001 -> 0.0005" in caplog.text
    assert "tokenizer.grad_weight 0.5 -> 0.25" in caplog.text
    resumes = checkpoint.load(final).card["resumes"]
    assert resumes == [
        {"step": 1, "changes": {}},
        {
            "step": 2,
            "changes": {
                "tokenizer.grad_weight": [0.5, 0.25],
                "train.lr": [0.001, 0.0005],
                "train.steps": [4, 6],
            },
        },
    ]
    assert checkpoint.load(train(kl, tmp_path / "straight", 2)).card["resumes"] == []


def test_setting_changes_leaves_out_invocation_settings_and_unused_new_options():
    saved = {"out": "runs/a", "train": {"lr": 1e-3, "threads": 1}, "model": {"dim": 8}}
    now = {
        "out": "/abs/runs/a",
        "train": {"lr": 1e-3, "threads": 2},
        "model": {"dim": 8, "new_option": 0.0, "other_new": 0.5},
    }
    assert setting_changes(saved, now) == {"model.other_new": [None, 0.5]}
    assert setting_changes(now, saved) == {  # a setting dropped since is a change
        "model.new_option": [0.0, None],
        "model.other_new": [0.5, None],
    }
    assert setting_changes({"a": (1, 2)}, {"a": [1, 2]}) == {}  # tuples as JSON lists


def test_restarted_codes_start_afresh_in_the_ema_and_the_optimizer(tmp_path):
    """Dead codes moved onto encoder outputs mid-run: the EMA copies those rows (averaging
    would ship codes halfway to nowhere), and their AdamW moments restart (first moment
    zero, second the live rows' mean) instead of carrying what the old codes had; so does
    the first moment of the whole codebook at its data-dependent init."""
    from vidgen.tokenizers.larp import LARP_CONFIGS, LARPTokenizer

    overrides = [
        *[o for o in LARP_SMALL if o != "train.ema_decay=0"],
        f"tokenizer.autoencoder={make_autoencoder(tmp_path)}",
        "train.ema_decay=0.999",
        "tokenizer.restart_every=1",
        "tokenizer.dead_usage=0.015625",  # 1/64: a code the step's batch did not use is dead
        "train.lr=0",  # nothing moves but the codebook's init and restarts
    ]
    run = tmp_path / "run"
    train(overrides, run, 3, stop_at=2)  # step 2: the data-dependent init
    before = tensors(run / "state.safetensors")
    names = [n for n, _ in LARPTokenizer(LARP_CONFIGS["test"]).named_parameters()]
    key = f"optim.{names.index('quantizer.codebook')}"
    # The init replaced every code: none keeps the warm-up's first moment.
    assert (before[f"{key}.exp_avg"] == 0).all() and before[f"{key}.exp_avg_sq"].any()
    train(overrides, run, 3)  # step 3: a restart
    after = tensors(run / "state.safetensors")
    moved = (after["model.quantizer.codebook"] != before["model.quantizer.codebook"]).any(1)
    assert 0 < int(moved.sum()) < len(moved)
    assert torch.equal(after["ema.quantizer.codebook"], after["model.quantizer.codebook"])
    m, v = after[f"{key}.exp_avg"], after[f"{key}.exp_avg_sq"]
    assert (m[moved] == 0).all() and (m[~moved] != 0).any()
    torch.testing.assert_close(v[moved], v[~moved].mean(0).expand_as(v[moved]))
    assert not torch.equal(v[~moved], before[f"{key}.exp_avg_sq"][~moved])  # live rows go on


def test_export_evaluates_on_the_models_device(tmp_path):
    """Held-out batches are kept on the CPU; at export they go to the model's device (on a
    GPU the final evaluation failed with 'Expected all tensors to be on the same device'
    after the whole run had trained). A model on the meta device stands in for the GPU."""
    from torch import nn

    from vidgen.train.loop import Task, TrainConfig, _export

    seen: list[tuple[str, str]] = []

    class Stop(Exception):
        pass

    def before_export(model, batches):
        seen.append(("before_export", batches[0]["x"].device.type))
        return None

    def evaluate(model, batches):
        seen.append(("evaluate", batches[0]["x"].device.type))
        raise Stop

    model = nn.Linear(2, 2, device="meta")
    task = Task(
        name="model",
        model=model,
        loss=None,
        train_data=None,
        eval_data=None,
        batch_size=1,
        export_config=None,
        run_config=None,
        card={},
        evaluate=evaluate,
        before_export=before_export,
    )
    batches = [{"x": torch.zeros(1, 2)}]
    with pytest.raises(Stop):
        _export(task, model, tmp_path, TrainConfig(), batches, [], 0.0, 1)
    assert seen == [("before_export", "meta"), ("evaluate", "meta")]
    assert batches[0]["x"].device.type == "cpu"  # the caller's list is left as it was


def test_a_larp_gains_a_context_decoder_by_fine_tuning_on_consecutive_clips(tmp_path):
    """init= a plain LARP with tokenizer.context_decoder=true: the new parameters start
    fresh (the card says which), the frozen encoder keeps its ids, and training reads clips
    in consecutive runs of data.clip_len / frames (only a context decoder may)."""
    from vidgen.tokenizers.larp import LARPConfig, LARPTokenizer

    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    base = train(larp, tmp_path / "base", 3)
    two = [o for o in larp if not o.startswith("data.clip_len")] + ["data.clip_len=8"]
    with pytest.raises(ValueError, match="holds 2 clips"):
        train([*two, f"init={base}"], tmp_path / "plain", 1)
    frozen = "freeze=[encoder,quantizer,to_code,queries,patch_in,patch_pos,prior]"
    context = ["tokenizer.context_decoder=true", "tokenizer.seam_weight=1"]
    with pytest.raises(ValueError, match="tokenizer.dead_usage=0.0002 must not exceed"):
        train([*larp, "tokenizer.codebook_size=8192"], tmp_path / "dead", 1)
    # One clip a video: the context path would never be trained, yet decoding reads it.
    with pytest.raises(ValueError, match="must be k x frames=4 with k >= 2"):
        train([*larp, *context, f"init={base}", frozen], tmp_path / "one", 1)
    tuned = train([*two, *context, f"init={base}", frozen], tmp_path / "ctx", 3)
    ckpt = checkpoint.load(tuned, expected_config=LARPConfig)
    assert ckpt.config_as(LARPConfig).context_decoder
    assert "new, not in it: context_null, context_pos" in ckpt.card["init"]
    before = LARPTokenizer(checkpoint.load(base).config_as(LARPConfig))
    checkpoint.load(base).load_into(before)
    after = LARPTokenizer(ckpt.config_as(LARPConfig))
    ckpt.load_into(after)
    assert after.encoder_fingerprint() == before.encoder_fingerprint()
    assert not torch.equal(
        tensors(tuned)["decoder.blocks.0.attn.qkv.weight"],
        tensors(base)["decoder.blocks.0.attn.qkv.weight"],
    )


def test_a_resume_trains_with_the_changed_optimizer_settings(tmp_path):
    """The saved optimizer groups carry the old weight decay and betas; the resumed run must
    use the new ones it records in its card, not export what a resume keeping the old ones
    would."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.ema_decay=0"]
    train(kl, tmp_path / "a", 4, stop_at=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same = tensors(train(kl, tmp_path / "a", 4))
    changed = checkpoint.load(train([*kl, "train.weight_decay=0.5"], tmp_path / "b", 4))
    assert changed.card["resumes"][-1]["changes"]["train.weight_decay"] == [0.0, 0.5]
    assert any(not torch.equal(same[n], changed.tensors[n]) for n in same)


def test_a_state_past_the_steps_asked_for_is_refused_and_an_ema_can_start_on_resume(tmp_path):
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.ema_decay=0"]
    train(kl, tmp_path, 4)
    with pytest.raises(TrainSetupError, match="at step 4, past train.steps=2"):
        train(kl, tmp_path, 2)
    # An EMA switched on at a resume starts from the resumed weights (the state has none).
    plain = tensors(tmp_path / "model.safetensors")
    smoothed = checkpoint.load(train([*kl, "train.ema_decay=0.5"], tmp_path, 5))
    assert smoothed.card["steps"] == 5 and plain.keys() == smoothed.tensors.keys()


def test_the_ema_warms_up_so_a_short_run_exports_what_it_trained(tmp_path):
    """Without a warm-up the EMA of a short run was nearly its random init (0.999^n of it
    after n steps): the model exported had hardly trained. With it (the default) the decay
    after step n is min(ema_decay, (1 + n) / (10 + n)), and a resume keeps the step count."""
    from vidgen.train.loop import EMA

    ema = EMA(torch.nn.Linear(2, 2), 0.999, warmup=True)
    assert [ema.decay_at(n) for n in (0, 890, 8990, 10**6)] == [0.1, 0.99, 0.999, 0.999]
    assert EMA(torch.nn.Linear(2, 2), 0.999).decay_at(0) == 0.999
    from vidgen.train.loop import TrainConfig

    for name in ("ema_warmup", "resume"):
        with pytest.raises(ValueError, match=f"train.{name} must be true or false, got 'false'"):
            TrainConfig(**{name: "false"})
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "train.ema_decay=0.999"]
    init = tensors(train([*kl, "train.lr=0"], tmp_path / "init", 4))
    warm = tensors(train(kl, tmp_path / "warm", 4))
    cold = tensors(train([*kl, "train.ema_warmup=false"], tmp_path / "cold", 4))
    raw = {
        k[len("model.") :]: v
        for k, v in tensors(tmp_path / "warm" / "state.safetensors").items()
        if k.startswith("model.")
    }

    def moved(weights) -> float:  # distance from the init, all float weights together
        return sum(float((weights[k] - init[k]).norm() ** 2) for k in init) ** 0.5

    assert moved(raw) > 0
    assert moved(cold) < 0.01 * moved(raw) < 0.5 * moved(raw) < moved(warm)
    # Step by step (a resume per step: the warm-up counts the run's steps, not the
    # invocation's), the export is the average of the raw weights at those decays.
    expected = {k: v.clone() for k, v in init.items()}
    for step in range(4):
        train(kl, tmp_path / "steps", 4, stop_at=step + 1)
        state = tensors(tmp_path / "steps" / "state.safetensors")
        for k in expected:
            expected[k].lerp_(state[f"model.{k}"], 1 - ema.decay_at(step))
    assert all(torch.equal(expected[k], warm[k]) for k in warm)


def test_without_an_ema_the_card_keeps_the_scale_the_run_started_from(tmp_path):
    """Measuring the latent scale at export must not rewrite the run's own config (the
    card's run_config) in place, whether the shipped model is an EMA copy or the model."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    base = checkpoint.load(train(kl, tmp_path / "base", 2))
    start = base.config["scale"]
    assert start != 1.0
    for decay in (0, 0.9):
        tuned = checkpoint.load(
            train([*kl, f"init={base.path}", f"train.ema_decay={decay}"], tmp_path / f"t{decay}", 2)
        )
        assert tuned.card["run_config"]["tokenizer"]["scale"] == start, decay


def test_eval_clips_zero_turns_a_generators_evaluation_off(tmp_path):
    kl = make_autoencoder(tmp_path)
    overrides = [
        "model=ca2vdm-test",
        *SMALL_BOUNCING,
        "data.clip_len=6",
        "data.num_clips=8",
        "data.eval_clips=0",
        f"frozen_tokenizer={kl}",
        "model.num_actions=0",
    ]
    card = checkpoint.load(train(overrides, tmp_path / "run", 2)).card
    assert card["eval"] == {} and not any("eval_" in k for row in card["history"] for k in row)


def test_eval_clips_zero_turns_a_larps_evaluation_off_and_a_kl_says_why_it_needs_some(tmp_path):
    # Both built an eval split of 0 clips and failed naming num_clips.
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={make_autoencoder(tmp_path)}"]
    card = checkpoint.load(train([*larp, "data.eval_clips=0"], tmp_path / "larp", 3)).card
    assert card["eval"] == {} and not any("eval_" in k for row in card["history"] for k in row)
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "data.eval_clips=0"]
    with pytest.raises(TrainSetupError, match="data.eval_clips must be >= 1 for the KL"):
        train(kl, tmp_path / "kl", 1)


def test_a_missing_eval_root_is_named(tmp_path):
    from vidgen.data import DataConfig, build_dataset

    missing = tmp_path / "nowhere"
    data = DataConfig(name="folder", root=str(tmp_path), eval_root=str(missing))
    with pytest.raises(FileNotFoundError, match="data.eval_root=.* is not a folder"):
        build_dataset(data, "eval")


@pytest.mark.parametrize(
    "overrides, message",
    [
        # An `optional` preset group skipped a typo: the first trained the DiT under the
        # typo's name, the second said nothing of the presets there are.
        (["model=ca2vdm-tiny", "tokenizer=kl-tny"], "Could not find 'tokenizer/kl-tny'"),
        (["model=ca2vdm-tny"], "Available options in 'model'"),
        ([], "choose exactly one of tokenizer=<preset> or model=<preset>"),
    ],
)
def test_a_mistyped_preset_is_refused(overrides, message):
    with pytest.raises(Exception, match=re.escape(message)):
        load_config("train", overrides)


def test_a_fine_tune_keeps_its_inits_sampling_defaults(tmp_path):
    """The shipped ca2vdm-tiny's card names guidance 1 and contrast 1.15; a fine-tune of it
    exported without them and so rendered at guidance 2 and contrast 1 (not "as is")."""
    kl = make_autoencoder(tmp_path)
    base = ["model=ca2vdm-test", *SMALL_BOUNCING, "data.clip_len=4", "data.num_clips=2"]
    base += [f"frozen_tokenizer={kl}", "model.num_actions=0"]
    first = train(base, tmp_path / "a", 1)
    checkpoint.update_card(first, {"guidance": 1.0, "contrast": 1.15, "eta": 0.3})
    card = checkpoint.load(train([*base, f"init={first}"], tmp_path / "b", 1)).card
    assert (card["guidance"], card["contrast"], card["eta"]) == (1.0, 1.15, 0.3)
    assert card["sampling_defaults"] == f"from {first}"


def test_one_run_at_a_time_uses_a_run_folder(tmp_path):
    """A second run on the same out= is refused at once (it would clobber the first one's
    state and remove the temp files it is writing); a folder that cannot be written is named
    before anything is encoded."""
    from vidgen import fsutil
    from vidgen.train import LOCK_FILE, TrainSetupError

    kl = make_autoencoder(tmp_path)
    base = ["model=ca2vdm-test", *SMALL_BOUNCING, "data.clip_len=4", "data.num_clips=2"]
    base += [f"frozen_tokenizer={kl}", "model.num_actions=0"]
    out = tmp_path / "run"
    out.mkdir()
    writing = out / ".state.0a1b2c3d.tmp"  # the running one's state, being written
    writing.write_bytes(b"half a file")
    held = pytest.raises(TrainSetupError, match="another vidgen train is using out=")
    with fsutil.exclusive(out / LOCK_FILE), held:  # held as a running `vidgen train` does
        train(base, out, 1)
    assert writing.exists() and not list(out.glob("*.safetensors"))
    assert train(base, out, 1).name == "model.safetensors"  # free again
    assert not writing.exists()  # now a killed run's leftover: removed
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TrainSetupError, match="cannot write to out="):
        train(base, tmp_path / "file" / "run", 1)


def test_a_larps_held_out_clips_are_cached_apart_from_a_generators(tmp_path):
    """The LARP's held-out cache keeps the videos too: in a folder where a generator cached
    its held-out latents of the same data (no videos), the LARP read that file and failed."""
    kl = make_autoencoder(tmp_path)
    data = [*SMALL_BOUNCING, "data.clip_len=4", "data.num_clips=8", "data.eval_clips=2"]
    gen = ["model=ca2vdm-test", *data, f"frozen_tokenizer={kl}", "model.num_actions=0"]
    larp = [*LARP_SMALL, f"tokenizer.autoencoder={kl}"]
    assert set(data) <= set(larp)
    train(gen, tmp_path, 1)
    cfg = load_config("train", [*larp, "train.steps=2", "train.resume=false", f"out={tmp_path}"])
    cfg.name = "larp"
    assert run_train(cfg).name == "larp.safetensors"
    assert len(list(tmp_path.glob("latents+video-*-eval-*.safetensors"))) == 1


def test_world_clips_are_keyed_by_the_worlds_version(monkeypatch):
    from vidgen.data import DataConfig
    from vidgen.train import encoded

    data = DataConfig(name="bouncing")
    before = encoded.data_description(data, "train")
    monkeypatch.setattr(encoded, "WORLDS_VERSION", encoded.WORLDS_VERSION + 1)
    assert encoded.data_description(data, "train") != before


def test_the_worlds_frames_are_those_of_their_version():
    """A tripwire: the worlds' frames and actions for fixed settings and seeds, hashed. A change
    that makes them other must raise WORLDS_VERSION (and update the digest here): an
    AgentWorld change on 2026-12-03 did not, and caches of its clips made before were trained
    on as current."""
    import hashlib

    from vidgen.worlds import WORLDS_VERSION, BouncingShapes, BouncingShapesConfig
    from vidgen.worlds.agent import AgentWorldConfig, iter_trajectory

    digest = hashlib.sha256()
    for seed in (0, 1):
        for frame in BouncingShapes(BouncingShapesConfig(), seed=seed).iter_frames(24):
            digest.update(np.ascontiguousarray(frame).tobytes())
    for cfg, policy in (
        (AgentWorldConfig(), "random"),
        (AgentWorldConfig(continuous=True, max_speed=0.5), "push"),
        (AgentWorldConfig(continuous=True), "random"),
    ):
        for piece in iter_trajectory(cfg, 0, 48, policy=policy):
            digest.update(np.ascontiguousarray(piece.frames).tobytes())
            digest.update(np.ascontiguousarray(piece.actions).tobytes())
    assert (WORLDS_VERSION, digest.hexdigest()) == (
        2,
        "6a1ab4563b8afce6b72aede53588cc634cd493f68b70efe2b72c4296d4cf2646",
    )


def test_folder_clips_are_keyed_by_the_readers_version(tmp_path, monkeypatch):
    """read_video's frames for some files changed (odd-height 4:2:0 video, open GOPs, ...
    read with PyAV): a folder's cached clips were keyed by its files alone."""
    from vidgen.data import DataConfig
    from vidgen.io import VideoWriter
    from vidgen.train import encoded

    with VideoWriter(tmp_path / "a.mp4") as writer:
        writer.write(np.zeros((8, 16, 16, 3), np.uint8))
    data = DataConfig(name="folder", root=str(tmp_path))
    before = encoded.data_description(data, "train")
    monkeypatch.setattr(encoded, "READER_VERSION", encoded.READER_VERSION + 1)
    assert encoded.data_description(data, "train") != before


def test_a_resume_on_another_thread_count_is_recorded(tmp_path, caplog):
    """CPU sums depend on the thread count: a resume with another one is not bitwise equal to
    the uninterrupted run, and was not even logged (train.threads is an invocation setting)."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    before = torch.get_num_threads()
    try:
        train([*kl, "train.threads=1"], tmp_path, 2, stop_at=1)
        assert checkpoint.load(tmp_path / "state.safetensors").card["threads"] == 1
        with caplog.at_level("WARNING"):
            final = train([*kl, "train.threads=2"], tmp_path, 2)
    finally:
        torch.set_num_threads(before)
    assert "torch threads 1 -> 2" in caplog.text
    assert checkpoint.load(final).card["resumes"] == [
        {"step": 1, "changes": {"torch threads": [1, 2]}}
    ]


def test_a_resume_into_another_architecture_is_refused_naming_the_change(tmp_path):
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    train(kl, tmp_path, 2, stop_at=1)
    with pytest.raises(
        TrainSetupError,
        match=r"does not fit this run's model \(changed since "
        r"it was saved: tokenizer.latent_channels 4 -> 8\)",
    ):
        train([*kl, "tokenizer.latent_channels=8"], tmp_path, 2)


def test_a_resume_into_another_architecture_is_refused_before_the_data_is_made(
    tmp_path, monkeypatch
):
    """The state's weights are compared with the model before the task renders and encodes
    the data (minutes to hours); they were refused only after that, by train()."""
    import vidgen.train as train_module

    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    train(kl, tmp_path, 2, stop_at=1)

    def made(cfg):
        raise AssertionError("the task was made (its data rendered and encoded)")

    monkeypatch.setattr(train_module, "_preset_task", made)
    with pytest.raises(TrainSetupError, match=r"tokenizer.latent_channels 4 -> 8\): "):
        train([*kl, "tokenizer.latent_channels=8"], tmp_path, 2)
    assert (tmp_path / "state.safetensors").exists()  # kept: the same settings resume it


@pytest.mark.parametrize("key", ["grad_clip", "max_seconds"])
def test_nan_train_settings_are_refused_by_name(key):
    with pytest.raises(ValueError, match=f"train.{key} must be finite, got nan"):
        TrainConfig(**{key: float("nan")})


def test_an_nbp_run_over_frames_of_another_size_is_refused_before_encoding(tmp_path):
    from tests.models import save_test_generators

    save_test_generators(tmp_path / "models")
    overrides = [
        "model=nbp-test",
        *SMALL_BOUNCING,
        "data.size=64",
        "data.clip_len=8",
        "data.num_clips=4",
        f"frozen_tokenizer={tmp_path / 'models' / 'larp-test.safetensors'}",
    ]
    with pytest.raises(TrainSetupError, match="data.size=64 must equal the tokenizer's frame"):
        train(overrides, tmp_path / "run", 2)
    assert not (tmp_path / "run").exists()


def _ca2vdm_run(kl: str) -> list[str]:
    return [
        "model=ca2vdm-test",
        *SMALL_BOUNCING,
        "data.clip_len=6",
        "data.num_clips=8",
        f"frozen_tokenizer={kl}",
        "model.num_actions=0",
    ]


def test_a_resume_after_the_frozen_tokenizer_changed_is_refused(tmp_path):
    """The file a generator's latents come from was replaced between two invocations: the
    resume encoded a new cache and went on, so the export's card named the new tokenizer
    for weights half trained on the old one's latents."""
    kl = make_autoencoder(tmp_path)
    run = _ca2vdm_run(kl)
    train(run, tmp_path / "r", 4, stop_at=2)
    other = randomize_(KLAutoencoder(KL_CONFIGS["test"]), seed=1, std=0.1)
    checkpoint.save(kl, other, KL_CONFIGS["test"])
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    with pytest.raises(TrainSetupError, match="another frozen_tokenizer .*fingerprint"):
        train(run, tmp_path / "r", 4)
    assert checkpoint.load(tmp_path / "r" / "state.safetensors").card["step"] == 2  # kept
    # Refused before a clip was encoded with it (every clip was, then the caches stayed).
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before


def test_a_state_whose_generator_was_on_another_device_resumes_reseeded(tmp_path):
    """A state saved by a CUDA run holds a CUDA generator's 16-byte state, which a CPU
    generator cannot load: resuming it on the CPU was a raw RuntimeError."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    train(kl, tmp_path, 4, stop_at=2)
    path = tmp_path / "state.safetensors"
    state = checkpoint.load(path)
    moved = {**state.tensors, "rng.train": torch.zeros(16, dtype=torch.uint8)}
    assert state.card["rng_device"] == "cpu"
    run = load_config("train", [*kl, "train.steps=4", f"out={tmp_path}"])
    run.name = "model"
    checkpoint.save(path, moved, run, card={**state.card, "rng_device": "cuda"})
    final = checkpoint.load(train(kl, tmp_path, 4))
    assert final.card["resumes"] == [
        {"step": 2, "changes": {"random generator": ["cuda state", "cpu, reseeded"]}}
    ]


def test_running_a_finished_run_again_records_no_resume(tmp_path):
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    first = checkpoint.load(train(kl, tmp_path, 2))
    again = checkpoint.load(train(kl, tmp_path, 2))
    assert first.card["resumes"] == again.card["resumes"] == []
    assert first.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)


def test_a_damaged_state_is_a_setup_error(tmp_path):
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    train(kl, tmp_path, 4, stop_at=2)
    (tmp_path / "state.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(TrainSetupError, match="state.safetensors .*train.resume=false"):
        train(kl, tmp_path, 4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["frozen_tokenizer=kl-tiny"], "frozen_tokenizer is for generators"),
        (["data.root=/tmp"], "data.root is for data=folder"),
        (["data.eval_root=/tmp"], "data.eval_root is for data=folder"),
        (["data.stride=2"], "data.stride is for data=folder"),
        (["init=nope.safetensors"], "init=nope.safetensors: checkpoint file"),
    ],
)
def test_settings_the_run_would_ignore_or_cannot_load_are_refused_by_name(tmp_path, extra, message):
    with pytest.raises((TrainSetupError, ValueError), match=message):
        train(["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", *extra], tmp_path, 2)


def test_a_frozen_tokenizer_of_the_wrong_kind_is_named(tmp_path):
    from tests.models import save_test_generators

    save_test_generators(tmp_path / "models")
    larp = tmp_path / "models" / "larp-test.safetensors"
    with pytest.raises(TrainSetupError, match=f"frozen_tokenizer={larp}: .*LARPConfig"):
        train(_ca2vdm_run(str(larp)), tmp_path / "a", 2)


def test_a_model_without_actions_on_data_with_actions_is_warned_about(caplog):
    """The presets take no actions: trained on data=agent they ignore them without a word,
    found only when a request with actions is refused."""
    import dataclasses
    import logging

    from vidgen.data import DataConfig
    from vidgen.models.ca2vdm import CA2VDM_CONFIGS
    from vidgen.train.diffusion import check_actions_fit

    plain = dataclasses.replace(CA2VDM_CONFIGS["test"], num_actions=0, action_dim=0)
    with caplog.at_level(logging.WARNING, logger="vidgen.train.diffusion"):
        check_actions_fit(plain, DataConfig(name="bouncing"))
        assert not caplog.records
        check_actions_fit(plain, DataConfig(name="agent"))
    assert "set model.num_actions=5" in caplog.text and "ignore them" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vidgen.train.diffusion"):
        check_actions_fit(dataclasses.replace(plain, num_actions=5), DataConfig(name="agent"))
    assert not caplog.records


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.device=mps"], "train.device must be auto, cpu, cuda or cuda:N, got 'mps'"),
        (["train.device=meta"], "train.device must be auto, cpu, cuda or cuda:N, got 'meta'"),
        (["name=state"], "name='state' would export over the run's own resume point"),
        (["name=latents-x"], "would export over the run's own encoded clips"),
    ],
)
def test_settings_that_failed_later_are_refused_at_the_start(tmp_path, overrides, message):
    """mps and meta passed as devices and failed with tracebacks at the first tensor; an
    export named 'state' went over the resume point (which then could not be resumed)."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    with pytest.raises(ValueError, match=message):
        train([*kl, *overrides], tmp_path / "run", 2)
    assert not (tmp_path / "run").exists()


def test_a_larp_on_frames_needs_rgb_and_init_of_another_size_is_named(tmp_path):
    """larp-test reads 4-channel latents: on frames it failed at the first step with a
    shape error; a KL init of another size was not reported under init=."""
    larp = ["tokenizer=larp-test", *SMALL_BOUNCING, "data.size=16", "data.clip_len=4"]
    with pytest.raises(ValueError, match="tokenizer.channels=4: set tokenizer.channels=3"):
        train([*larp, "tokenizer.size=16"], tmp_path / "larp", 2)
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2"]
    with pytest.raises(ValueError, match="init=kl-tiny: .*does not fit"):
        train([*kl, "init=kl-tiny"], tmp_path / "init", 2)


@pytest.mark.parametrize(
    ("preset", "module"),
    [
        (["tokenizer=larp-tiny", "tokenizer.patch_t=1", "init=larp-tiny"], "tokenizer"),
        (["model=ca2vdm-tiny", "model.patch=1", "init=ca2vdm-tiny"], "diffusion"),
    ],
)
def test_an_init_of_another_architecture_is_refused_before_any_data(
    tmp_path, monkeypatch, preset, module
):
    """tokenizer.patch_t=1 init=larp-tiny (patch_t=2) was refused only after the data were
    rendered and encoded (16 minutes for 4,096 clips): the shapes are compared first."""
    import importlib

    def no_data(*args, **kwargs):
        raise AssertionError("data built before the init was compared")

    monkeypatch.setattr(importlib.import_module(f"vidgen.train.{module}"), "build_dataset", no_data)
    with pytest.raises(ValueError, match=r"init=\w+-tiny: .*does not fit .*shape"):
        train([*preset, "data=bouncing"], tmp_path / "run", 2)
    assert not (tmp_path / "run").exists()


def test_an_empty_data_root_is_named_and_threads_hold_while_encoding(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    folder = ["tokenizer=kl-test", "data=folder", f"data.root={tmp_path / 'empty'}"]
    with pytest.raises(ValueError, match=r"data.root='.*empty': no video files"):
        train([*folder, "data.size=32", "data.clip_len=2"], tmp_path / "run", 2)
    # train.threads is set before the clips are encoded (it held for training only).
    from vidgen.train import encoded

    seen = []
    real = encoded.EncodedClips.__init__

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        real(self, *args, **kwargs)

    monkeypatch.setattr(encoded.EncodedClips, "__init__", spy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        kl = make_autoencoder(tmp_path)
        train([*_ca2vdm_run(kl), "train.threads=1"], tmp_path / "t", 1)
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}


def test_the_default_frozen_tokenizer_named_or_not_is_no_change(tmp_path):
    """A resume naming frozen_tokenizer=kl-tiny, the default a run left unset (or the other
    way round), was recorded as a changed setting."""
    run = [
        "model=ca2vdm-test",
        "model.latent_size=8",
        "data=bouncing",
        "data.size=64",
        "data.clip_len=4",
        "data.batch_size=2",
        "data.num_clips=4",
        "data.eval_clips=2",
        "model.num_actions=0",
    ]
    for first, second in (([], ["frozen_tokenizer=kl-tiny"]), (["frozen_tokenizer=kl-tiny"], [])):
        out = tmp_path / str(len(first))
        train([*run, *first], out, 2, stop_at=1)
        final = checkpoint.load(train([*run, *second], out, 2))
        assert final.card["resumes"] == [{"step": 1, "changes": {}}]


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, caplog):
    """The default warmup (200) with train.steps=100: the rate never reached train.lr."""
    kl = ["tokenizer=kl-test", *SMALL_BOUNCING, "data.clip_len=2", "data.num_clips=4"]
    with caplog.at_level("WARNING", logger="vidgen.train.loop"):
        train([*kl, "train.warmup=3"], tmp_path / "long", 2)
    assert "train.warmup=3 is not below train.steps=2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vidgen.train.loop"):
        train([*kl, "train.warmup=1"], tmp_path / "short", 2)
    assert "warmup" not in caplog.text

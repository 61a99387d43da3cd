"""Training: the shared loop and the task of each model (``vidgen train ...``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vidgen import checkpoint
from vidgen.data import DataConfig
from vidgen.fsutil import exclusive, expand_user, remove_temps
from vidgen.io import VideoReadError
from vidgen.train.encoded import data_description, naming
from vidgen.train.loop import (
    DATA_FILES,
    INIT_CARD,
    SAMPLING_CARD_KEYS,
    STATE_FILE,
    StepSampler,
    Task,
    TrainConfig,
    TrainingDiverged,
    TrainSetupError,
    lr_at,
    resolve_device,
    resuming,
    setting_changes,
    train,
    unfit_state,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"  # in the run folder: one vidgen train at a time uses a folder
# The tokenizer whose codes a generator family models unless frozen_tokenizer names another.
DEFAULT_FROZEN_TOKENIZERS = {"Ca2VDMConfig": "kl-tiny", "NBPConfig": "larp-tiny"}
# The kinds of encoded-clip caches in a run folder (``encoded.cache_path``: <kind>-<key>...).
CACHE_KINDS = ("latents", "latents+video", "tokens")

__all__ = [
    "StepSampler",
    "Task",
    "TrainCommandConfig",
    "TrainConfig",
    "TrainSetupError",
    "TrainingDiverged",
    "lr_at",
    "run_train",
    "train",
]


@dataclass
class TrainCommandConfig:
    """``vidgen train tokenizer=<preset> | model=<preset> data=<source> train.<key>=...``.
    ``name`` (default: the chosen preset) names the exported file ``<out>/<name>.safetensors``;
    ``out`` defaults to ``runs/<name>``."""

    tokenizer: Any = None
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = ""
    out: str = ""
    frozen_tokenizer: str = ""  # generators: the tokenizer whose latents they model
    # Fine-tuning: start from the weights of this checkpoint (name or path; the preset, with
    # any overrides, must have its architecture) and keep the parameters under these name
    # prefixes fixed (e.g. freeze=[encoder] for a KL decoder that must keep its latent space).
    init: str = ""
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.tokenizer is None) == (self.model is None):
            raise ValueError("choose exactly one of tokenizer=<preset> or model=<preset>")
        if self.freeze and not self.init:
            raise ValueError("freeze needs init=<checkpoint>: frozen random weights stay random")
        if self.name and (Path(self.name).name != self.name or self.name in (".", "..")):
            # name=../x exported out/../x.safetensors: outside out, beside other runs.
            raise ValueError(
                f"name must be a file name (the export is out/<name>.safetensors), got "
                f"{self.name!r}: out= chooses the folder"
            )
        if self.name == Path(STATE_FILE).stem or self.name.startswith(
            tuple(f"{kind}-" for kind in CACHE_KINDS)
        ):
            # Exported as out/<name>.safetensors: over the resume point (which could then
            # not be resumed) or a cache of encoded clips.
            raise ValueError(
                f"name={self.name!r} would export over the run's own "
                + ("resume point" if self.name == Path(STATE_FILE).stem else "encoded clips")
                + ": choose another name"
            )
        if self.frozen_tokenizer and self.tokenizer is not None:
            raise ValueError(
                "frozen_tokenizer is for generators (model=...): a tokenizer trains on frames "
                "(a LARP names its autoencoder as tokenizer.autoencoder)"
            )


def build_task(
    cfg: TrainCommandConfig,
    resume: checkpoint.Checkpoint | None = None,
    state: checkpoint.Checkpoint | None = None,
    out: Path | None = None,
) -> Task:
    """The task of the chosen preset, started from ``cfg.init`` with ``cfg.freeze`` fixed
    when fine-tuning. ``resume``: the run's saved state, when a fine-tune is resumed; it
    stands in for its ``init`` (whose file is then neither needed nor read: it may have been
    replaced or removed since the run began), and the card keeps the init the run began
    from. ``state``: the saved state of any run being resumed (in ``out``), whose weights
    must fit the model before the task is made (making it renders and encodes the data)."""
    init, fits = None, True  # fits: the resumed state's weights loaded into the model
    field_name = "tokenizer" if cfg.tokenizer is not None else "model"
    target = getattr(cfg, field_name)
    began = (resume.card.get(INIT_CARD) if resume is not None and cfg.init else None) or {}
    if resume is not None and cfg.init and not began:
        # A plain run's state: loaded over the init by train(), the fine-tune went on from
        # that run's weights and step (with init= as README's commands give, no steps at all)
        # while its card claimed the init and a frozen encoder.
        raise TrainSetupError(
            "the run folder holds the resume point of a run that did not start from an init: "
            f"a fine-tune from init={cfg.init} would go on from it instead; give the "
            "fine-tune another out=, or train.resume=false to start it over there"
        )
    # Hyperparameters come from the command (a different architecture fails to load below);
    # values measured on the trained model (the KL's latent scale) from the init, or from
    # the state of a resumed fine-tune (as they were when the run began).
    measured = getattr(type(target), "MEASURED", ())
    if began:
        saved = resume.config.get(field_name) or {}
        values = {k: saved[k] for k in measured if k in saved}
    elif cfg.init:
        with naming("init", cfg.init):
            init = checkpoint.load(cfg.init, expected_config=type(target))
        trained = init.config_as(type(target))
        values = {k: getattr(trained, k) for k in measured}
    if cfg.init:
        cfg = replace(cfg, **{field_name: replace(target, **values)})
    if getattr(cfg.tokenizer, "latent_noise", 0) and "encoder" not in cfg.freeze:
        # The noise is sized in scaled-latent units, which only a trained, frozen encoder
        # (its scale measured) has; a trainable encoder could also outgrow a fixed noise.
        raise ValueError(
            "tokenizer.latent_noise is for fine-tuning a decoder under a trained encoder: "
            "use it with init=<kl checkpoint> 'freeze=[encoder]'"
        )
    if init is not None or state is not None:
        # The architecture is compared before the task is made: making it renders and
        # encodes the data (minutes to an hour), and an init of another shape (say
        # tokenizer.patch_t=1 from a patch_t=2 file), or a resumed state of another one, was
        # refused only after that.
        with torch.device("meta"):
            probe = _preset(getattr(cfg, field_name))[0](getattr(cfg, field_name))
        if init is not None:
            with naming("init", cfg.init):
                init.check_fits(probe, missing_ok=getattr(probe, "ADDED_BY_FINE_TUNES", ()))
        if state is not None:
            try:
                state.check_fits(probe, prefix="model.")
            except checkpoint.CheckpointError as err:  # as train() would say it, later
                changes = setting_changes(state.config, asdict(cfg))
                raise unfit_state(Path(out or "."), changes, err) from None
        if cfg.init:  # a freeze naming no parameter, or part of an encoder, refused now too
            freeze_parameters(probe, cfg.freeze)
            check_encoder_freeze(probe, cfg.freeze)
    task = _preset_task(cfg)
    if init is not None:
        with naming("init", cfg.init):  # a checkpoint of another size, under its setting
            fresh = init.load_into(
                task.model, missing_ok=getattr(task.model, "ADDED_BY_FINE_TUNES", ())
            )
        task.card = {
            **task.card,
            "init": f"{cfg.init} (sha256 {init.sha256[:16]})"
            + (f"; new, not in it: {', '.join(fresh)}" if fresh else ""),
        }
        # A generator's sampling defaults (its best settings, measured on the weights it
        # starts from) carry over, so a fine-tune can replace it as is; its card says so.
        carried = {k: init.card[k] for k in SAMPLING_CARD_KEYS if k in init.card}
        if carried:
            task.card = {**task.card, **carried, "sampling_defaults": f"from {cfg.init}"}
    elif began:
        # The weights (and buffers: a quantizer switched on) the run has reached; train()
        # loads the whole state again, optimizer included (and refuses one that does not fit
        # this run's model, naming the settings changed: the checks below wait for it).
        try:
            resume.load_into(task.model, prefix="model.")
        except checkpoint.CheckpointError:
            fits = False
        task.card = {**task.card, **began}
    if cfg.init:
        frozen = freeze_parameters(task.model, cfg.freeze)
        check_encoder_freeze(task.model, cfg.freeze)
        described = f"{frozen} parameters under {cfg.freeze}" if cfg.freeze else "none"
        task.card = {**task.card, "frozen": described}
    quantizer = getattr(task.model, "quantizer", None)
    warmup = getattr(cfg.tokenizer, "vq_warmup", 0)
    if (
        fits
        and quantizer is not None
        and not bool(quantizer.active)
        and quantizer.codebook.requires_grad
        and warmup > cfg.train.steps
    ):
        # The codebook is initialised and quantisation switched on at the warm-up's last step.
        raise ValueError(
            f"tokenizer.vq_warmup={warmup} must be <= train.steps={cfg.train.steps}: this run "
            "would end in the VQ warm-up and export a tokenizer that never quantised"
        )
    if cfg.data.name == "folder":  # the videos themselves (name, size, mtime): a resume
        # over other files trains on other data, which its card's resumes then record (the
        # other data settings are compared as settings).
        files = json.loads(data_description(cfg.data, "train"))["files"]
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
        task.card = {**task.card, DATA_FILES: digest}
    return task


def freeze_parameters(model: torch.nn.Module, prefixes: list[str]) -> int:
    """Keep every parameter whose name is or starts with ``prefix.`` fixed; returns how many.
    A prefix that names no parameter is an error (a typo would silently train everything)."""
    params = dict(model.named_parameters())
    chosen: set[str] = set()
    for prefix in prefixes:
        hits = {n for n in params if n == prefix or n.startswith(prefix + ".")}
        if not hits:
            tops = sorted({n.split(".")[0] for n in params})
            raise ValueError(f"freeze: {prefix!r} names no parameter (top-level names: {tops})")
        chosen |= hits
    for name in chosen:
        params[name].requires_grad_(False)
    return len(chosen)


def check_encoder_freeze(model: torch.nn.Module, prefixes: list[str]) -> None:
    """A freeze that fixes part of a tokenizer's encoding path (``ENCODER_TENSORS``: what its
    encoder fingerprint covers) but not all of it is refused: the rest would still train, the
    ids or latents would change, and every model trained on them would be refused at load
    only later. Freezing all of it, or none, is fine."""
    encoding = getattr(model, "ENCODER_TENSORS", ())
    if not encoding or not prefixes:
        return
    params = {n: p for n, p in model.named_parameters() if n.startswith(tuple(encoding))}
    loose = sorted(n for n, p in params.items() if p.requires_grad)
    if loose and len(loose) < len(params):
        tops = list(dict.fromkeys(n.split(".")[0] for n in loose))
        raise ValueError(
            f"freeze={prefixes} fixes only part of what this {type(model).__name__}'s codes "
            f"depend on (its encoder fingerprint): {', '.join(loose[:6])}"
            f"{' ...' if len(loose) > 6 else ''} would still train; freeze them too "
            f"('freeze=[{','.join([*prefixes, *tops])}]') or none of them"
        )


def _preset(config: object) -> tuple[type[torch.nn.Module], Callable[[TrainCommandConfig], Task]]:
    """The model a preset's config makes and the task that trains it, by the config's type."""
    from vidgen.models.ca2vdm import Ca2VDMConfig, CausalVideoDiT
    from vidgen.models.nbp import NBPConfig, NextBlockTransformer
    from vidgen.tokenizers.kl import KLAutoencoder, KLConfig
    from vidgen.tokenizers.larp import LARPConfig, LARPTokenizer
    from vidgen.train.diffusion import ca2vdm_task
    from vidgen.train.tokenizer import kl_task, larp_task
    from vidgen.train.tokens import nbp_task

    def frozen(task: Callable[..., Task]) -> Callable[[TrainCommandConfig], Task]:
        return lambda cfg: task(
            cfg.model, cfg.data, cfg, cfg.name, _frozen_tokenizer(cfg), out_dir(cfg)
        )

    presets: dict[type, tuple[type[torch.nn.Module], Callable[[TrainCommandConfig], Task]]] = {
        KLConfig: (KLAutoencoder, lambda cfg: kl_task(cfg.tokenizer, cfg.data, cfg, cfg.name)),
        LARPConfig: (
            LARPTokenizer,
            lambda cfg: larp_task(cfg.tokenizer, cfg.data, cfg, cfg.name, out_dir(cfg)),
        ),
        Ca2VDMConfig: (CausalVideoDiT, frozen(ca2vdm_task)),
        NBPConfig: (NextBlockTransformer, frozen(nbp_task)),
    }
    for kind, preset in presets.items():
        if isinstance(config, kind):
            return preset
    raise ValueError(f"no training task for {type(config).__name__}")


def _preset_task(cfg: TrainCommandConfig) -> Task:
    target = cfg.tokenizer if cfg.tokenizer is not None else cfg.model
    return _preset(target)[1](cfg)


def _frozen_tokenizer(cfg: TrainCommandConfig) -> str:
    """The tokenizer a generator's run models: ``frozen_tokenizer``, else its family's."""
    return cfg.frozen_tokenizer or DEFAULT_FROZEN_TOKENIZERS[type(cfg.model).__name__]


def run_train(cfg: TrainCommandConfig) -> Path:
    """Train (or resume) and export; returns the exported checkpoint's path."""
    if not cfg.name:
        raise ValueError("name must be set (the CLI fills it from the chosen preset)")
    out = out_dir(cfg)
    lock = out / LOCK_FILE
    made = [p for p in (out, *out.parents) if not p.exists()]  # out first, then parents
    with contextlib.ExitStack() as held:
        try:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive(lock))
        except BlockingIOError:
            raise TrainSetupError(
                f"another vidgen train is using out={out} (it holds {lock}): wait for it to "
                "end, or train in another folder"
            ) from None
        except OSError as err:  # a read-only or unwritable folder: say so before encoding
            raise TrainSetupError(f"cannot write to out={out}: {err}") from err
        # Under the lock the folder is this run's alone: the temp files a killed run left
        # (its state, model, caches or a sample video being written) can go.
        stale = sum(remove_temps(folder) for folder in (out, out / "samples"))
        if stale:
            log.info("removed %d temporary file(s) a killed run left in %s", stale, out)
        torch.manual_seed(cfg.train.seed)  # the model's initial weights are part of the run
        state, resume = out / STATE_FILE, None
        if cfg.train.resume and state.exists():
            with contextlib.suppress(checkpoint.CheckpointError):  # damaged: train() says so
                resume = checkpoint.load(state)
        if resume is not None and cfg.model is not None:
            # The default tokenizer, left unset or named, spelled as the state has it: naming
            # it on a resume (or not) was recorded as a changed setting.
            default = DEFAULT_FROZEN_TOKENIZERS.get(type(cfg.model).__name__, "")
            saved = resume.config.get("frozen_tokenizer")
            if saved in ("", default) and cfg.frozen_tokenizer in ("", default):
                cfg = replace(cfg, frozen_tokenizer=saved)
        try:
            resolve_device(cfg.train.device)  # no CUDA for train.device=cuda: refused here
            if cfg.train.threads:  # also while the clips are encoded (often the longest part)
                torch.set_num_threads(cfg.train.threads)
            # A state of another frozen tokenizer is refused before any clip is encoded.
            with resuming(out, None if resume is None else resume.card):
                task = build_task(cfg, resume if cfg.init else None, resume, out)
            del resume  # train() reads the state itself: not held for the whole run
        except (FileNotFoundError, ValueError, VideoReadError, checkpoint.CheckpointError) as err:
            if made and [p.name for p in out.iterdir()] == [LOCK_FILE]:
                lock.unlink()  # a run refused at setup leaves no folder it made behind
                for folder in made:
                    with contextlib.suppress(OSError):  # not empty: something else is there
                        folder.rmdir()
            raise TrainSetupError(str(err)) from err
        return train(task, cfg.train, out)


def out_dir(cfg: TrainCommandConfig) -> Path:
    return expand_user(cfg.out or f"runs/{cfg.name}")

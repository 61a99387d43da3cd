"""The training loop shared by every model: seeded, resumable bit for bit, checkpointed.

Everything a step depends on is a function of (config, step) or is saved: the batch of step
s is a fixed set of dataset indices (``StepSampler``), the noise comes from one
``torch.Generator`` whose state is saved, the learning rate is a pure function of the step,
and the optimizer, EMA and model tensors are saved in safetensors. So N steps in one run equal
N/2 steps, a resume, and N/2 more, bitwise on CPU. A task may bring an ``Adversary`` (a GAN
discriminator) that the loop trains with its own optimizer after the model's step; its weights
and moments are saved beside the model's.

A run folder holds ``state.safetensors`` (resume point, written atomically every
``ckpt_every`` steps and at the end) and ``<name>.safetensors`` (the exported model: EMA
weights, its config and a model card), which is what ships in ``vidgen/assets/``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from vidgen import checkpoint
from vidgen.validate import check_int, check_number

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
MAX_SEED = 2**32 - 1  # x 1,000,003 + a step stays within torch's 64-bit generator seed


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``device="auto"`` = CUDA when available; ``threads`` 0
    leaves torch's default; ``ema_decay`` 0 disables the EMA (then the raw weights ship);
    with ``ema_warmup`` its decay after step n is min(ema_decay, (1 + n) / (10 + n)), so the
    early average is not the random init's (at 0.999 without it, 37% of the weights exported
    after 1,000 steps were still the init's); ``grad_clip`` 0 turns gradient clipping off."""

    steps: int = 10_000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    log_every: int = 50
    eval_every: int = 1000
    eval_batches: int = 4
    ckpt_every: int = 500
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast: for CUDA; a CPU runs it too, slowly)
    resume: bool = True
    stop_at: int = 0  # stop (with a resumable state) after this step; 0 = run to `steps`
    # A time box: once this invocation has trained this many seconds (data preparation not
    # counted), save the state and export the model as it is (its card says the step
    # reached; the schedule is not compressed). 0 = off.
    max_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("log_every", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batches < 0:
            raise ValueError(f"train.eval_batches must be >= 0, got {self.eval_batches}")
        # check_number refuses NaN, which passed a plain `< 0` (a NaN clip wrecked the weights)
        check_number("train.grad_clip", self.grad_clip, minimum=0)
        check_number("train.lr", self.lr, minimum=0)
        check_number("train.min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1)
        check_number("train.beta1", self.beta1, minimum=0, below=1)
        check_number("train.beta2", self.beta2, minimum=0, below=1)
        check_number("train.weight_decay", self.weight_decay, minimum=0)
        for name in ("warmup", "stop_at", "threads", "seed"):
            check_int(f"train.{name}", getattr(self, name), minimum=0)
        if self.seed > MAX_SEED:  # seeds per epoch and step (seed x 1,000,003 + n) overflowed
            raise ValueError(f"train.seed must be <= {MAX_SEED}, got {self.seed}")
        check_number("train.max_seconds", self.max_seconds, minimum=0)
        for name in ("resume", "ema_warmup"):  # from Python, "false" was taken as true
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda"):  # mps, meta: a traceback at the first tensor
                raise ValueError(
                    f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
                )


class TrainSetupError(ValueError):
    """The run could not be set up from its config: no usable videos under ``data.root``, an
    ``init`` or frozen tokenizer that is missing or does not fit, a state past the steps
    asked for, ... (nothing trained in this invocation)."""


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was not finite: training stopped before that step's
    update, so the saved state (the resume point) and the weights are those of before."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay towards ``min_lr_ratio`` x lr, reached at step
    ``steps`` (one past the last: the last step runs a little above it)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


class StepSampler(Sampler[list[int]]):
    """Batches of dataset indices, a pure function of (seed, step): epoch e is a seeded
    permutation of the dataset, and batch s takes the next ``batch_size`` indices."""

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int, steps: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.steps = start_step, steps

    def indices(self, step: int) -> list[int]:
        out: list[int] = []
        pos = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.size)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.size, generator=gen)
            take = perm[offset : offset + self.batch_size - len(out)].tolist()
            out += take
            pos += len(take)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            yield self.indices(step)

    def __len__(self) -> int:
        return self.steps - self.start_step


# Parameters set outright after a step: name -> None (all of it) or the indices of its rows.
Resets = Mapping[str, "torch.Tensor | None"]


class EMA:
    """Exponential moving average of a model's parameters (buffers copied). With ``warmup``
    the decay after step n (0-based) is min(decay, (1 + n) / (10 + n)): 0.1 at the first
    step, 0.99 from step 890, ``decay`` (0.999) from step 8,990 on."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, reset: Resets | None = None, step: int = 0) -> None:
        """Move towards ``model`` after ``step``; what ``reset`` names (whole parameters, or
        the given rows of them) is copied."""
        decay = self.decay_at(step)
        rows = reset or {}
        pairs = zip(self.model.named_parameters(), model.parameters(), strict=True)
        for (name, ema_p), p in pairs:
            if name in rows and rows[name] is None:
                ema_p.copy_(p.detach())
                continue
            ema_p.lerp_(p.detach(), 1.0 - decay)
            if name in rows:
                index = rows[name].to(ema_p.device)
                ema_p[index] = p.detach()[index]
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


def as_resets(reset: Resets | Collection[str] | None) -> dict[str, torch.Tensor | None]:
    """``after_step``'s answer as name -> rows (None = the whole parameter); a plain
    collection of names resets those parameters whole."""
    if not reset:
        return {}
    return dict(reset) if isinstance(reset, Mapping) else dict.fromkeys(reset)


@torch.no_grad()
def reset_rows(opt: torch.optim.Optimizer, model: nn.Module, reset: Resets) -> None:
    """Restart the AdamW moments of parameters, or rows of them, set outright: first moment
    zero (the old direction belonged to what they replaced), second moment the mean of the
    other rows' (the gradient scale of a live row), or kept as it was where no other rows
    are left (a whole parameter)."""
    params = dict(model.named_parameters())
    for name, index in reset.items():
        state = opt.state.get(params[name])
        if not state or "exp_avg" not in state:
            continue
        m, sq = state["exp_avg"], state["exp_avg_sq"]
        if index is None:
            m.zero_()
            continue
        index = index.to(m.device)
        m[index] = 0
        others = torch.ones(sq.shape[0], dtype=torch.bool, device=sq.device)
        others[index] = False
        if others.any():
            sq[index] = sq[others].mean(dim=0)


@dataclass
class Adversary:
    """A network trained against the model, e.g. a GAN discriminator.

    From step ``start`` on, ``active`` is True: the task's loss may then add an adversarial
    term that reads ``module`` (whose weights are frozen during the model's backward), and
    after the model's optimizer step the loop minimises ``loss(module, batch, model_out)``
    with its own AdamW (same learning-rate schedule, betas 0.5/0.9 as in VQGAN).
    ``model_out`` is the dict the task's loss returned (e.g. with detached fakes)."""

    module: nn.Module
    loss: Callable[[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
    start: int = 0
    active: bool = False


@dataclass
class Task:
    """What the loop trains. ``loss(model, batch, generator)`` returns a dict with a scalar
    ``loss`` plus metrics; ``evaluate(model, batches)`` returns metrics on held-out batches;
    ``export_config`` is the model's config dataclass; ``card`` describes the model."""

    name: str
    model: nn.Module
    loss: Callable[[nn.Module, dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]
    train_data: Dataset
    eval_data: Dataset | None
    batch_size: int
    export_config: Any
    run_config: Any
    card: dict[str, Any]
    evaluate: Callable[[nn.Module, list[dict[str, torch.Tensor]]], dict[str, float]] | None = None
    # Called after each optimizer step with the model, the step and the loss dict; returns
    # what it set outright, by parameter name: None for the whole parameter (e.g. a
    # codebook's data-dependent init), or the indices of the rows (e.g. restarted dead
    # codes). The EMA copies those instead of averaging towards them, and their optimizer
    # moments start afresh (``reset_rows``).
    after_step: Callable[[nn.Module, int, dict[str, torch.Tensor]], Resets | None] | None = None
    # Called with the model that ships; returns its final config (e.g. a measured latent scale).
    before_export: Callable[[nn.Module, list[dict[str, torch.Tensor]]], Any] | None = None
    # Called every ``eval_every`` steps and at export with the model, the step and the run
    # folder: writes sample videos (e.g. ``<out>/samples/step-000500.mp4``).
    samples: Callable[[nn.Module, int, Path], None] | None = None
    adversary: Adversary | None = None
    num_workers: int = 0  # DataLoader worker processes (``data.num_workers``)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _optim_tensors(
    opt: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's moments as named tensors, and its param groups (for the card)."""
    state = opt.state_dict()
    tensors = {
        f"{prefix}.{idx}.{key}": torch.as_tensor(value)
        for idx, per_param in state["state"].items()
        for key, value in per_param.items()
    }
    return tensors, state["param_groups"]


_OPTIM_SETTINGS = ("betas", "weight_decay", "eps")  # taken from this run's config on resume


def _load_optim(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, groups: list
) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, idx, key = name.split(".", 2)
            per_param.setdefault(int(idx), {})[key] = value
    # The saved groups carry the saved run's hyperparameters; a resume that changes them
    # (recorded in the card's resumes) must train with the new ones. lr is set every step.
    settings = [{k: g[k] for k in _OPTIM_SETTINGS if k in g} for g in opt.param_groups]
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    for group, kept in zip(opt.param_groups, settings, strict=True):
        group.update(kept)


def _state_tensors(
    model: nn.Module,
    ema: EMA | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    adv: tuple[Adversary, torch.optim.Optimizer] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    moments, groups = _optim_tensors(opt, "optim")
    tensors.update(moments)
    tensors["rng.train"] = gen.get_state()
    card: dict[str, Any] = {"param_groups": groups}
    if adv is not None:
        tensors.update({f"adv.{k}": v for k, v in adv[0].module.state_dict().items()})
        moments, card["adv_param_groups"] = _optim_tensors(adv[1], "adv_optim")
        tensors.update(moments)
    return tensors, card


def _load_state(
    ckpt: checkpoint.Checkpoint,
    model: nn.Module,
    ema: EMA | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    adv: tuple[Adversary, torch.optim.Optimizer] | None = None,
) -> tuple[int, float]:
    ckpt.load_into(model, prefix="model.")
    if ema is not None:
        averaged = {k[4:]: v for k, v in ckpt.tensors.items() if k.startswith("ema.")}
        if averaged:
            ema.model.load_state_dict(averaged, strict=True)
        else:  # an EMA switched on when resuming a run that trained without one
            log.info("the state has no EMA: it starts from the resumed weights")
            ema.model.load_state_dict(model.state_dict())
    _load_optim(opt, ckpt.tensors, "optim", ckpt.card["param_groups"])
    _load_rng(gen, ckpt)
    if adv is not None:
        if "adv_param_groups" in ckpt.card:
            ckpt.load_into(adv[0].module, prefix="adv.")
            _load_optim(adv[1], ckpt.tensors, "adv_optim", ckpt.card["adv_param_groups"])
        else:  # e.g. a GAN switched on when resuming a run that trained without one
            log.info("the state has no adversary: it starts from its initial weights")
    step = ckpt.card["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"its step must be an int >= 0, got {step!r}")
    return step, float(ckpt.card.get("wall_seconds", 0.0))


def _load_rng(gen: torch.Generator, ckpt: checkpoint.Checkpoint) -> None:
    """The training generator's state; one saved on another kind of device (a run moved
    from a GPU to the CPU, or back) cannot be loaded there: the generator is seeded from the
    step instead (``train`` records the change in the card's resumes)."""
    if ckpt.card.get("rng_device", gen.device.type) == gen.device.type:
        try:
            gen.set_state(ckpt.tensors["rng.train"])
            return
        except RuntimeError as err:  # a state of before rng_device was saved, from elsewhere
            log.warning("the state's random generator does not load here (%s)", err)
    gen.manual_seed(RESEED + int(ckpt.card["step"]))


RESEED = 1_000_003  # generator seed (+ the step) of a run resumed on another kind of device
# What the training data of a task is made from (a frozen tokenizer's or autoencoder's
# encoder fingerprint, in its card) and the setting that names it: a resume must not mix data.
FROZEN_INPUTS = {
    "tokenizer_fingerprint": "frozen_tokenizer",
    "autoencoder_fingerprint": "tokenizer.autoencoder",
}
# The run folder and card of the state a run resumes, while its task is built (``resuming``):
# a task checks its frozen input as soon as it is loaded (``check_frozen_input``), before it
# encodes every clip with another one (minutes to hours, then refused by ``train``).
_RESUMING: contextvars.ContextVar[tuple[Path, Mapping[str, Any]] | None] = contextvars.ContextVar(
    "resuming", default=None
)


@contextlib.contextmanager
def resuming(out: Path, card: Mapping[str, Any] | None) -> Iterator[None]:
    """Within it, ``check_frozen_input`` compares with ``card`` (a saved state's; None: no
    state to resume)."""
    token = _RESUMING.set(None if card is None else (Path(out), card))
    try:
        yield
    finally:
        _RESUMING.reset(token)


def check_frozen_input(key: str, fingerprint: str) -> None:
    """A task's frozen input (``FROZEN_INPUTS`` key, its encoder fingerprint) against the
    state being resumed (``resuming``), if any."""
    found = _RESUMING.get()
    if found is not None:
        _check_frozen(found[0], key, found[1].get(key), fingerprint)


def _check_frozen(out: Path, key: str, saved: Any, now: Any) -> None:
    if saved is not None and saved != now:
        setting = FROZEN_INPUTS[key]
        raise TrainSetupError(
            f"the state in {out} was trained on the data of another {setting} (encoder "
            f"fingerprint {saved}, now {now}): its steps so far and the rest would mix two "
            f"latent spaces. Resume with the {setting} it was saved with, or start over with "
            "another out (or train.resume=false)"
        )


# A folder run's videos (a digest of their names, sizes and mtimes, in the card): a resume
# over other files is recorded as a change, as a changed setting is.
DATA_FILES = "data_files"
HISTORY_KEPT = 20  # log entries carried in the state and the exported card
# A fine-tune's state keeps what its card says of the init it began from (under INIT_CARD):
# a resume takes them from there, not from the init file, which may have changed since.
INIT_CARD = "began_from"
# A generator's sampling defaults in its card (what ``from_pretrained`` reads): a fine-tune
# carries them over from its init.
SAMPLING_CARD_KEYS = ("guidance", "contrast", "eta")
INIT_CARD_KEYS = ("init", *SAMPLING_CARD_KEYS, "sampling_defaults")


def train(task: Task, cfg: TrainConfig, out: str | Path) -> Path:
    """Run (or resume) training; returns the path of the exported model (or of the resumable
    state when ``stop_at`` ended this invocation early)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.warmup >= cfg.steps:
        log.warning(
            "train.warmup=%d is not below train.steps=%d: the learning rate never reaches "
            "train.lr=%g nor decays (a shorter warmup, or more steps?)",
            cfg.warmup,
            cfg.steps,
            cfg.lr,
        )
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = task.model.to(device).train()
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    adv = None
    if task.adversary is not None:
        module = task.adversary.module.to(device).train()
        adv = (task.adversary, torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=(0.5, 0.9)))
    start, before = 0, 0.0  # steps and wall seconds of earlier runs
    history: list[dict[str, float]] = []  # metrics logged, earlier runs' included
    resumes: list[dict[str, Any]] = []  # each resume's step and changed settings
    state_path = out / STATE_FILE
    threads = torch.get_num_threads()  # CPU sums, so results, depend on it
    if cfg.resume and state_path.exists():
        try:
            state = checkpoint.load(state_path)
        except checkpoint.CheckpointError as err:  # damaged: say what to do, no traceback
            raise TrainSetupError(
                f"{err}. Start over with another out (or train.resume=false), or restore the file"
            ) from None
        changes = setting_changes(state.config, dataclasses.asdict(task.run_config))
        saved_threads = state.card.get("threads")
        if device.type == "cpu" and saved_threads not in (None, threads):
            changes["torch threads"] = [saved_threads, threads]
        for key in FROZEN_INPUTS:
            _check_frozen(out, key, state.card.get(key), task.card.get(key))
        saved_files, files = state.card.get(DATA_FILES), task.card.get(DATA_FILES)
        if saved_files is not None and files is not None and saved_files != files:
            changes["data.root videos"] = [saved_files, files]
        saved_rng = state.card.get("rng_device", gen.device.type)
        if saved_rng != gen.device.type:
            changes["random generator"] = [f"{saved_rng} state", f"{gen.device.type}, reseeded"]
        try:
            start, before = _load_state(state, model, ema, opt, gen, adv)
        except checkpoint.CheckpointError as err:  # another architecture, or NaN weights
            raise unfit_state(out, changes, err) from None
        except torch.OutOfMemoryError:  # a good state on a full device: not "damaged"
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # its card edited
            raise TrainSetupError(
                f"the state in {out} is damaged ({type(err).__name__}: {err}). Start over with "
                "another out (or train.resume=false), or restore the file"
            ) from None
        history = list(state.card.get("history", []))
        resumes = list(state.card.get("resumes", []))
        del state  # loaded into the model and optimizer: not held for the whole run
        if start < cfg.steps or changes:  # a finished run exported again is not a resume
            resumes.append({"step": start, "changes": changes})
        log.info("resuming %s from step %d", state_path, start)
        if changes:
            log.warning(
                "resuming with settings changed since the state was saved (recorded in the "
                "card's resumes): %s",
                _describe_changes(changes),
            )
    # The schedule always spans `steps`; `stop_at` only ends this invocation early.
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    if start > end:
        raise TrainSetupError(
            f"the state in {out} is at step {start}, past train.steps={cfg.steps}"
            + (f" / train.stop_at={cfg.stop_at}" if cfg.stop_at else "")
            + ": ask for more steps to go on, or start over with another out (or "
            "train.resume=false)"
        )
    sampler = StepSampler(len(task.train_data), task.batch_size, cfg.seed, start, end)
    loader = DataLoader(
        task.train_data,
        batch_sampler=sampler,
        num_workers=task.num_workers,
        persistent_workers=task.num_workers > 0,
    )
    eval_batches = _eval_batches(task, cfg)
    t0, bar = (
        time.perf_counter(),
        tqdm(total=cfg.steps, initial=start, desc=task.name, disable=None),
    )
    step, done = start, end  # done: the step this invocation ends after
    for step, batch in enumerate(loader, start=start):
        for group in [*opt.param_groups, *(adv[1].param_groups if adv else [])]:
            group["lr"] = lr_at(step, cfg)
        result = _train_step(task, model, _to(batch, device), gen, opt, cfg, adv, step)
        metrics = {k: float(v.detach()) for k, v in result.items() if v.numel() == 1}
        reset = as_resets(task.after_step(model, step, result) if task.after_step else None)
        reset_rows(opt, model, reset)
        if ema is not None:
            ema.update(model, reset, step)
        bar.update(1)
        logged = (step + 1) % cfg.log_every == 0
        if logged or step == start:  # a resumed run logs its first step too ...
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            if logged or step == 0:  # ... but its history is an uninterrupted run's
                history.append({"step": step + 1, **metrics})
            log.info(
                "step %d %s", step + 1, json.dumps({k: round(v, 5) for k, v in metrics.items()})
            )
        if task.evaluate is not None and eval_batches and (step + 1) % cfg.eval_every == 0:
            scores = task.evaluate(
                ema.model if ema else model, [_to(b, device) for b in eval_batches]
            )
            log.info("eval step %d %s", step + 1, json.dumps(scores))
            history.append({"step": step + 1, **{f"eval_{k}": v for k, v in scores.items()}})
        if task.samples is not None and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            _samples(task, ema.model if ema else model, step + 1, out)
        boxed = bool(cfg.max_seconds) and time.perf_counter() - t0 >= cfg.max_seconds
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == end or boxed:
            wall = before + time.perf_counter() - t0
            _save_state(
                state_path, task, model, ema, opt, gen, step + 1, wall, adv, history, resumes
            )
        if boxed and step + 1 < end:
            done = step + 1
            log.info(
                "train.max_seconds=%g reached at step %d of %d: exporting the model as it is "
                "(run again to resume)",
                cfg.max_seconds,
                done,
                cfg.steps,
            )
            break
    bar.close()
    seconds = before + time.perf_counter() - t0
    if done == end and end < cfg.steps:
        log.info("stopped at step %d of %d; run again to resume", end, cfg.steps)
        return state_path
    model = ema.model if ema else model
    return _export(task, model, out, cfg, eval_batches, history, seconds, done, resumes)


# Settings of one invocation, not of the run: changing them on resume changes no result.
INVOCATION_SETTINGS = frozenset(
    {
        "out",
        "name",
        "train.stop_at",
        "train.max_seconds",
        "train.resume",
        "train.threads",
        "train.log_every",
        "train.ckpt_every",
        "data.num_workers",
    }
)


def unfit_state(out: Path, changes: Mapping[str, list[Any]], err: Exception) -> TrainSetupError:
    """The error of a saved state whose weights do not fit this run's model (``err``, from
    ``checkpoint``), naming the settings ``changes`` since it was saved."""
    if isinstance(err, checkpoint.NonFiniteWeights):
        return TrainSetupError(
            f"{err}: this state cannot be resumed. Start over with another out (or "
            "train.resume=false)"
        )
    named = _describe_changes(changes)
    return TrainSetupError(
        f"the state in {out} does not fit this run's model"
        + (f" (changed since it was saved: {named})" if named else "")
        + f": {err}. Resume with its settings, or start over with another out (or "
        "train.resume=false)"
    )


def setting_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The run settings (dotted keys) that differ between a saved state's config and this
    invocation's: ``{key: [saved, now]}`` (None where a side lacks the key); invocation-only
    settings (``INVOCATION_SETTINGS``) are left out, and so is a setting the saved state
    predates whose value now is off (0, False, empty: an option added since, unused)."""
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(now)))
    return {
        key: [a.get(key), b.get(key)]
        for key in sorted(a.keys() | b.keys())
        if key not in INVOCATION_SETTINGS
        and a.get(key) != b.get(key)
        and not (key not in a and not b.get(key))
    }


def _describe_changes(changes: Mapping[str, list[Any]]) -> str:
    """``setting_changes`` as ``key old -> new, ...``."""
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _train_step(
    task: Task,
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    gen: torch.Generator,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    adv: tuple[Adversary, torch.optim.Optimizer] | None = None,
    step: int = 0,
) -> dict[str, torch.Tensor]:
    device_type = next(model.parameters()).device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    if adv is not None:
        adv[0].active = step >= adv[0].start
        adv[0].module.requires_grad_(False)  # the model's loss may read it, never train it
    with autocast:
        out = task.loss(model, batch, gen)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    clip = cfg.grad_clip or math.inf  # 0 = off: the norm is still measured
    out["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), clip)
    # Before the update: a NaN step would make every weight NaN, and the next state saved
    # would overwrite the last good resume point with them (then be exported, silently).
    _check_finite(
        out["loss"],
        out["grad_norm"],
        f"the {{}} at step {step + 1} is {{}}: training stopped before that step's update (lr "
        f"{opt.param_groups[0]['lr']:.3g}, train.grad_clip={cfg.grad_clip:g}). The last "
        "state saved stays the resume point; lower train.lr, keep train.grad_clip on, or "
        "check the data",
    )
    opt.step()
    if adv is not None and adv[0].active:
        adversary, adv_opt = adv
        adversary.module.requires_grad_(True)
        with autocast:
            adv_loss = adversary.loss(adversary.module, batch, out)
        adv_opt.zero_grad(set_to_none=True)
        adv_loss.backward()
        adv_norm = nn.utils.clip_grad_norm_(adversary.module.parameters(), clip)
        _check_finite(  # as the model's: a NaN update would be saved into the resume point
            adv_loss,
            adv_norm,
            f"the discriminator's {{}} at step {step + 1} is {{}}: training stopped before "
            "its update. The last state saved stays the resume point; lower train.lr or "
            "tokenizer.gan_weight, or start the GAN later (tokenizer.gan_start)",
        )
        adv_opt.step()
        out["adv_loss"] = adv_loss.detach()
    return out


def _check_finite(loss: torch.Tensor, norm: torch.Tensor, message: str) -> None:
    """Raise TrainingDiverged (``message`` formatted with what is not finite and its value)
    unless the loss and the grad norm are finite: one host sync for both (the loop reads the
    metrics after the step anyway)."""
    watched = torch.stack([loss.detach().float(), norm.detach().float()])
    if not bool(torch.isfinite(watched).all()):
        value, grad = watched.tolist()
        bad = ("loss", value) if not math.isfinite(value) else ("grad norm", grad)
        raise TrainingDiverged(message.format(*bad))


def batch_shares(batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Each held-out batch's share of their clips, to weigh its scores by: a plain mean over
    batches counted a short last one (eval clips not a multiple of the batch size) as much
    as a full one, so the same clips scored differently batched differently."""
    sizes = [len(next(iter(batch.values()))) for batch in batches]
    return [n / sum(sizes) for n in sizes]


def _eval_batches(task: Task, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    if task.eval_data is None or task.evaluate is None:
        return []
    loader = DataLoader(task.eval_data, batch_size=task.batch_size, shuffle=False)
    return [b for _, b in zip(range(cfg.eval_batches), loader, strict=False)]


def _save_state(
    path: Path,
    task: Task,
    model: nn.Module,
    ema: EMA | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    step: int,
    wall: float,
    adv: tuple[Adversary, torch.optim.Optimizer] | None = None,
    history: list[dict[str, float]] | None = None,
    resumes: list[dict[str, Any]] | None = None,
) -> None:
    tensors, card = _state_tensors(model, ema, opt, gen, adv)
    card.update(step=step, wall_seconds=wall, history=(history or [])[-HISTORY_KEPT:])
    card["resumes"] = resumes or []
    # CPU results depend on the thread count (reduction order): a resume compares it.
    card["threads"] = torch.get_num_threads()
    card["rng_device"] = gen.device.type
    card.update({k: task.card[k] for k in (*FROZEN_INPUTS, DATA_FILES) if k in task.card})
    if "init" in task.card:
        card[INIT_CARD] = {k: task.card[k] for k in INIT_CARD_KEYS if k in task.card}
    checkpoint.save(path, tensors, task.run_config, card=card)


def _samples(task: Task, model: nn.Module, step: int, out: Path) -> None:
    """Sample videos from ``model`` without touching the training state: the model's mode is
    restored and sampling draws only from its own seeded generators."""
    was_training = model.training
    rng = torch.random.get_rng_state()
    try:
        task.samples(model, step, out)
    except Exception:  # a preview must not end the run (a GPU run lost its lane so)
        log.exception("samples at step %d failed; training goes on", step)
    finally:
        torch.random.set_rng_state(rng)
        model.train(was_training)


def _export(
    task: Task,
    model: nn.Module,
    out: Path,
    cfg: TrainConfig,
    eval_batches: list[dict[str, torch.Tensor]],
    history: list[dict[str, float]],
    seconds: float,
    steps: int,
    resumes: list[dict[str, Any]] | None = None,
) -> Path:
    export_config = task.export_config
    # Held-out batches are kept on the CPU; the model may be on the GPU.
    device = next(model.parameters()).device
    eval_batches = [_to(b, device) for b in eval_batches]
    if task.before_export is not None:
        export_config = task.before_export(model, eval_batches)
    final = task.evaluate(model, eval_batches) if task.evaluate and eval_batches else {}
    card = {
        **task.card,
        "steps": steps,
        "wall_seconds": round(seconds, 1),
        "train_config": dataclasses.asdict(cfg),
        "run_config": dataclasses.asdict(task.run_config),
        "eval": final,
        "history": history[-HISTORY_KEPT:],
        "resumes": resumes or [],
    }
    path = out / f"{task.name}.safetensors"
    checkpoint.save(path, model, export_config, card=card)
    if task.samples is not None:
        _samples(task, model, steps, out)
    log.info("exported %s (%s)", path, json.dumps(final))
    return path

"""Hydra configs: the structured-config schemas and composing a command's config.

The schemas are the config dataclasses of the library (STYLE.md rule 2); the YAML files in
``configs/`` (installed as ``vidgen.configs``) only set values. Each CLI command composes one
top-level YAML with the user's ``key=value`` overrides through Hydra's compose API and gets
back a typed dataclass instance.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

CONFIG_MODULE = "vidgen.configs"


class ConfigError(ValueError):
    """A command's overrides do not compose into a valid config."""


# Groups of model presets (train only). Other commands have plain keys of the same names
# (``vidgen render model=ca2vdm-tiny``), which Hydra would read as group choices if the
# groups existed while they compose.
PRESET_GROUPS = ("tokenizer", "model")
NO_PRESETS = ("render", "preview")


# The ``presets`` of the last registration (None: none yet). Storing the schemas again
# converts every dataclass to a config anew: 0.12 s of each compose, which commands and tests
# do many times in one process.
_registered: bool | None = None


def register_schemas(presets: bool = True) -> None:
    """Store every schema in Hydra's ConfigStore (idempotent). Group schemas are named
    ``<group>_schema`` and a group's YAML files extend them through their defaults list.
    ``presets=False`` leaves out (removes) the model preset groups."""
    global _registered
    if _registered is presets:
        return
    from vidgen.data.loader import DataConfig
    from vidgen.data.preview import PreviewConfig
    from vidgen.eval.report import EvalConfig
    from vidgen.models.ca2vdm import CA2VDM_CONFIGS
    from vidgen.models.nbp import NBP_CONFIGS
    from vidgen.render_config import RenderConfig
    from vidgen.tokenizers.kl import KL_CONFIGS
    from vidgen.tokenizers.larp import LARP_CONFIGS
    from vidgen.train import TrainCommandConfig
    from vidgen.worlds.agent import AgentWorldConfig
    from vidgen.worlds.bouncing import BouncingShapesConfig

    cs = ConfigStore.instance()
    cs.store(group="world", name="bouncing_schema", node=BouncingShapesConfig)
    cs.store(group="world", name="agent_schema", node=AgentWorldConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(name="preview_schema", node=PreviewConfig)
    cs.store(name="train_schema", node=TrainCommandConfig)
    cs.store(name="render_schema", node=RenderConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    if not presets:
        for group in PRESET_GROUPS:
            cs.repo.pop(group, None)
        _registered = False
        return
    # Model sizes are named factories in the model code; each is a group option as it is.
    for prefix, sizes in (("kl", KL_CONFIGS), ("larp", LARP_CONFIGS)):
        for size, cfg in sizes.items():
            cs.store(group="tokenizer", name=f"{prefix}-{size}", node=cfg)
    for prefix, models in (("ca2vdm", CA2VDM_CONFIGS), ("nbp", NBP_CONFIGS)):
        for size, cfg in models.items():
            cs.store(group="model", name=f"{prefix}-{size}", node=cfg)
    _registered = True


def _initialize() -> Any:
    """Hydra's search path: the installed ``vidgen.configs``, or ``configs/`` beside the
    package when vidgen runs from a source checkout that was never installed
    (``PYTHONPATH=.``, as on a bare training machine)."""
    if importlib.util.find_spec(CONFIG_MODULE) is None:
        source = Path(__file__).resolve().parent.parent / "configs"
        if source.is_dir():
            return initialize_config_dir(config_dir=str(source), version_base=None)
    return initialize_config_module(config_module=CONFIG_MODULE, version_base=None)


def compose_config(config_name: str | None, overrides: Sequence[str] = ()) -> DictConfig:
    """The composed (untyped view of the) config ``configs/<config_name>.yaml``; with
    ``None``, only what the overrides add (``+data=mix``)."""
    return _compose(config_name, overrides)


def _compose(
    config_name: str | None, overrides: Sequence[str], return_hydra_config: bool = False
) -> DictConfig:
    """Hydra's compose, with every error it raises for the overrides as a ConfigError."""
    _refuse_hydra_keys(overrides)
    register_schemas(presets=config_name not in NO_PRESETS)
    try:
        with _initialize():
            return hydra_compose(config_name, list(overrides), return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_describe(err)) from err
    except (ValueError, AssertionError) as err:  # Hydra's own, for `group=null` or `+=`
        raise ConfigError(_hydra_refusal(err, overrides)) from err


def _refuse_hydra_keys(overrides: Sequence[str]) -> None:
    """``hydra.run.dir=x``, ``hydra.job.chdir=true`` or ``+hydra.foo=1`` were taken and did
    nothing: vidgen composes its configs with Hydra but runs no Hydra app (its ``hydra``
    node is dropped unread)."""
    for override in overrides:
        key = str(override).lstrip("~+").split("=", 1)[0].strip()
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise ConfigError(
                f"{override!r}: hydra settings are not read (vidgen runs no Hydra app: no run "
                "folder, no chdir, no logging config); out= names where a command writes"
            )


def _hydra_refusal(err: BaseException, overrides: Sequence[str]) -> str:
    """What Hydra raised as a plain ValueError or AssertionError (a config group set to
    null, an override with no key), said with the overrides it came from."""
    said = str(err)
    if isinstance(err, AssertionError) or not said:  # an internal check: its text is no help
        said = "Hydra could not read them (a `key=value` with no key?)"
    return f"{said} (in the overrides {' '.join(overrides)})"


def _unknown_keys(cfg: Any, where: str = "") -> list[str]:
    """Keys of a composed config that its schema dataclasses do not have: Hydra's ``+key=v``
    adds any key to a structured config, which ``to_object`` then drops without a word."""
    schema = OmegaConf.get_type(cfg)
    if not (dataclasses.is_dataclass(schema) and isinstance(schema, type)):
        return []
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = [f"{where}{k}" for k in cfg if k not in known]
    for key in cfg:
        if key in known and OmegaConf.is_dict(cfg._get_node(key)):
            unknown += _unknown_keys(cfg[key], f"{where}{key}.")
    return unknown


def load_config(config_name: str, overrides: Sequence[str] = ()) -> Any:
    """The composed config as its schema dataclass (validated by its ``__post_init__``);
    a key no schema has (``+framez=32``) is an error, not a setting dropped."""
    return _checked_object(config_name, compose_config(config_name, overrides))


def load_config_and_choices(
    config_name: str, overrides: Sequence[str] = ()
) -> tuple[Any, dict[str, str]]:
    """``load_config`` and ``group_choices`` from one composition (Hydra's compose is a few
    tenths of a second of every CLI start)."""
    cfg = _compose(config_name, overrides, return_hydra_config=True)
    choices = _choices(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return _checked_object(config_name, cfg), choices


def _checked_object(config_name: str, cfg: DictConfig) -> Any:
    unknown = _unknown_keys(cfg)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}: not settings of {config_name!r} (a typo? "
            "'+' adds a key, it cannot make one the command reads)"
        )
    return _to_object(cfg)


def _to_object(cfg: DictConfig, where: str = "") -> Any:
    """``OmegaConf.to_object``, its errors as ``ConfigError``s naming the nested config whose
    own check failed (``data.bouncing: need ... max_shapes <= 8``)."""
    try:
        return OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as err:
        text = _describe(err)
        key = _failing_key(cfg, where)
        if key and not text.startswith(f"{key}:") and f"{key}." not in text:
            text = f"{key}: {text}"
        raise ConfigError(text) from err


def _failing_key(cfg: DictConfig, where: str = "") -> str | None:
    """The dotted key of the innermost nested schema config that fails to build on its own."""
    for key in cfg:
        try:  # a missing (???) or unresolvable node fails when read: that is the key
            if not OmegaConf.is_dict(cfg._get_node(key)):
                continue
            if not dataclasses.is_dataclass(OmegaConf.get_type(cfg[key])):
                continue
            inner = _failing_key(cfg[key], f"{where}{key}.")
            if inner is not None:
                return inner
            OmegaConf.to_object(cfg[key])
        except (OmegaConfBaseException, ValueError):
            return f"{where}{key}"
    return None


def group_choices(config_name: str, overrides: Sequence[str] = ()) -> dict[str, str]:
    """Which option of each config group was chosen (``{"tokenizer": "kl-tiny", ...}``)."""
    return _choices(_compose(config_name, overrides, return_hydra_config=True))


def _choices(cfg: DictConfig) -> dict[str, str]:
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return {k: v for k, v in choices.items() if v is not None and not k.startswith("hydra")}


def load_group(group: str, option: str, overrides: Sequence[str] = ()) -> Any:
    """One option of a config group as its schema dataclass: ``load_group("data", "mix",
    ["data.batch_size=2"])``."""
    cfg = compose_config(None, [f"+{group}={option}", *overrides])
    return _to_object(cfg[group], f"{group}.")


def _describe(err: BaseException) -> str:
    """One readable line from a Hydra/OmegaConf error and its cause, without the search
    path and key-context lines they append, and without the internal ``*_schema`` options."""
    parts: list[str] = []
    where = ""
    for e in (err, err.__cause__):
        if e is None:
            continue
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line.startswith("full_key:") and not where:
                where = line.removeprefix("full_key:").strip()
            if not line or line.endswith("_schema") or line.startswith(_CONTEXT_LINES):
                continue
            if line not in parts:
                parts.append(line)
    text = " ".join(parts) or type(err).__name__
    # A nested schema's own check names only its leaf field: say which key it is under.
    if where and where not in text:
        text = f"{where}: {text}"
    return text


_CONTEXT_LINES = ("full_key:", "object_type=", "reference_type=", "provider=")

"""The clip-generator contract (DESIGN.md section 3) and its implementations."""

from typing import Any

from vidgen.generators.base import (
    Clip,
    ClipGenerator,
    ClipLatents,
    GenerationRequest,
    Stream,
    StreamSnapshot,
    check_dtype,
    generate_video,
)
from vidgen.generators.diffusion import DiffusionClipGenerator
from vidgen.generators.tokens import TokenClipGenerator

__all__ = [
    "Clip",
    "ClipGenerator",
    "ClipLatents",
    "DiffusionClipGenerator",
    "GenerationRequest",
    "Stream",
    "StreamSnapshot",
    "TokenClipGenerator",
    "check_generator",
    "check_generator_for",
    "generate_video",
    "load_generator",
]


def _families() -> dict[str, type]:
    from vidgen.models.ca2vdm import Ca2VDMConfig
    from vidgen.models.nbp import NBPConfig

    return {
        f"{Ca2VDMConfig.__module__}.{Ca2VDMConfig.__qualname__}": DiffusionClipGenerator,
        f"{NBPConfig.__module__}.{NBPConfig.__qualname__}": TokenClipGenerator,
    }


def check_generator_for(settings: Any) -> None:
    """``check_generator`` of ``settings.model`` with the family settings of ``settings``
    (a ``GenerationRequest``, or a render config that has the same fields)."""
    check_generator(
        settings.model,
        settings.reencode,
        settings.contrast,
        steps=settings.steps,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
    )


def check_generator(
    name_or_path: str,
    reencode: bool = False,
    contrast: float | None = None,
    steps: int = GenerationRequest.steps,
    temperature: float = GenerationRequest.temperature,
    top_k: int = GenerationRequest.top_k,
    top_p: float = GenerationRequest.top_p,
) -> None:
    """Raise ``ValueError`` unless ``name_or_path`` is a generator checkpoint (read from its
    header: cheap enough to check every item of a manifest), or if a setting of the other
    family is asked of it: ``reencode``, or ``temperature``/``top_k``/``top_p`` other than
    their defaults, of a model that is not a token model; a ``contrast`` other than 1, or
    ``steps`` other than the default, of one that is not a diffusion model (they were taken
    and ignored: the same frames under another request hash). ``CheckpointError`` if it is
    not a vidgen checkpoint at all."""
    from vidgen import checkpoint

    header = checkpoint.read_header(name_or_path)  # one read for its type and its card
    kind = header.config_type
    families = _families()
    if kind not in families:
        generators = [
            name for name in checkpoint.available() if checkpoint.config_type(name) in families
        ]
        raise ValueError(
            f"model {name_or_path!r} is a {kind.rsplit('.', 1)[-1]} checkpoint, not a "
            f"generator; shipped generators: {generators}"
        )
    tokens = families[kind] is TokenClipGenerator
    foreign = (
        {"contrast": contrast not in (None, 1), "steps": steps != GenerationRequest.steps}
        if tokens
        else {
            "reencode": bool(reencode),
            "temperature": temperature != GenerationRequest.temperature,
            "top_k": top_k != GenerationRequest.top_k,
            "top_p": top_p != GenerationRequest.top_p,
        }
    )
    for key, given in foreign.items():
        if given:
            raise ValueError(
                f"{key} applies to {'diffusion' if tokens else 'token'} models only; "
                f"{name_or_path} is a {'token' if tokens else 'diffusion'} model"
            )
    # The files it loads besides itself: a missing one failed only inside an actor.
    needed = [(header.path, header.card.get("tokenizer", families[kind].default_tokenizer))]
    while needed:
        owner, name = needed.pop()
        try:
            tok = checkpoint.read_header(checkpoint.companion(name, owner))
        except checkpoint.CheckpointError as err:
            raise ValueError(
                f"model {name_or_path!r} cannot load: the tokenizer it names ({name!r}) is "
                f"not usable: {err}"
            ) from err
        if tok.config.get("autoencoder"):
            needed.append((tok.path, tok.config["autoencoder"]))


def load_generator(
    name_or_path: str, max_streams: int = 8, device: str = "cpu", dtype: str = "float32"
) -> ClipGenerator:
    """The generator of a shipped name (``ca2vdm-tiny``, ``nbp-tiny``) or a checkpoint path,
    whichever family its config says it is; ``dtype`` is what its networks and cache run in
    (``float32`` or ``bfloat16``; see ``DTYPES``)."""
    from vidgen import checkpoint

    check_dtype(dtype)  # before the checkpoint is read: a typo is named first
    # Its header picks the family; the family's from_pretrained reads and verifies the file
    # (reading it whole here too read every generator twice).
    kind = checkpoint.config_type(name_or_path)
    families = _families()
    if kind not in families:
        raise ValueError(f"{name_or_path} is a {kind} checkpoint, not a generator")
    return families[kind].from_pretrained(name_or_path, max_streams, device, dtype)

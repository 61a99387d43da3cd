"""Checkpoints: safetensors files with the config, a format version and a model card inside.

No pickle anywhere: tensors are safetensors, everything else is JSON in the file's metadata.
A sha256 digest over the metadata and every tensor's name, dtype, shape and bytes is stored
too, so a file that was truncated, corrupted or edited is refused with a clear error instead
of loading garbage. Files are written to a temporary name and renamed, so an interrupted save
never leaves a half file under the final name.

    save("ckpt.safetensors", model, config, card={"data": "bouncing", "steps": 20000})
    ckpt = load("ckpt.safetensors", expected_config=MyConfig)
    model = MyModel(ckpt.config_as(MyConfig)); ckpt.load_into(model)

``resolve(name_or_path)`` maps a shipped name (``larp-tiny``) to ``vidgen/assets/<name>
.safetensors`` or accepts a path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import mmap
import os
import re
import struct
import sys
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

import vidgen
from vidgen.fsutil import expand_user, publish, temp_beside

FORMAT = "vidgen-checkpoint"
FORMAT_VERSION = 1
# Buffers a model may make beyond the size of the tensors its file holds (``build``): the
# models here make well under 1% of what they load (a LARP's masks and initial queries).
MADE_BUFFERS_ALLOWANCE = 64 * 2**20
SUFFIX = ".safetensors"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

C = TypeVar("C")
M = TypeVar("M", bound=torch.nn.Module)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupted, or does not fit what it is loaded into."""


class NonFiniteWeights(CheckpointError):
    """A checkpoint's weights hold NaN or inf: it fits its model, but would make noise."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint. ``config`` is the plain dict form of the config dataclass named by
    ``config_type``; ``sha256`` is the digest of the file's bytes (for provenance)."""

    path: Path
    config_type: str
    config: dict[str, Any]
    card: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    format_version: int
    vidgen_version: str
    sha256: str

    def config_as(self, cls: type[C]) -> C:
        """The config as an instance of the dataclass ``cls`` (nested dataclasses too)."""
        if _type_name(cls) != self.config_type:
            raise CheckpointError(
                f"{self.path} holds a {self.config_type} config, not a {_type_name(cls)}"
            )
        try:
            return _from_dict(cls, self.config)
        except CheckpointError as err:  # a digest recomputed over a hand-edited config
            raise CheckpointError(f"{self.path}: {err}") from err
        except (ValueError, TypeError) as err:  # the config's own checks (heads, NaN, ...)
            raise CheckpointError(f"{self.path}: config: {err}") from err

    def build(self, factory: Callable[[C], M], config_cls: type[C]) -> M:
        """``factory(config)`` with this file's weights loaded. The model is first made on
        the meta device and its shapes checked against the file's tensors: a file of a few
        bytes whose config describes a huge model is refused before anything is allocated
        (it was built whole, gigabytes, before the tensors were compared).

        That probe costs about 2 s in a fresh process (torch imports ``torch._dynamo`` for its
        meta kernels), paid by every actor start and restart: a file whose bytes passed it
        once, made by this model class (a class, not any callable) and its code under this
        torch, is remembered on disk (``probe_cache_dir``) and then made at once, the same
        checks run on the real model."""
        config = self.config_as(config_cls)
        marker = _probe_marker(self.sha256, factory, config_cls)
        remembered = marker is not None and _remembered(marker)
        # Checked once: on the meta-device probe, or on the model itself when remembered.
        checked = factory(config) if remembered else self._probe(factory, config)
        state = self._state("")
        self._check_buffers(checked)
        self._check_fits(checked, state, ())  # names, shapes, values
        model = checked if remembered else factory(config)
        model.load_state_dict(state, strict=True)
        if marker is not None and not remembered:
            with contextlib.suppress(OSError):  # a read-only home: probed again next time
                marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                if _own_folder(marker.parent):
                    marker.touch()
        return model

    def _probe(self, factory: Callable[[C], M], config: C) -> M:
        """``factory(config)`` made on the meta device (no memory allocated)."""
        try:
            with torch.device("meta"):
                return factory(config)
        except (RuntimeError, TypeError, OverflowError, ValueError) as err:
            # A config that passed its own checks but describes no model torch can make
            # (sizes past what it can count): the file's fault, named as such.
            raise CheckpointError(
                f"{self.path}: its {self.config_type} config describes no model torch can "
                f"build: {err}"
            ) from err

    def _check_buffers(self, probe: torch.nn.Module) -> None:
        """Buffers a model makes itself (masks, initial queries: not in the file) are sized
        by the config alone: a small file whose config asks for gigabytes of them is refused
        before they are made. Every model here makes far less of them than it loads."""
        kept = set(probe.state_dict())
        made = sum(b.numel() * b.element_size() for n, b in probe.named_buffers() if n not in kept)
        held = sum(t.numel() * t.element_size() for t in self.tensors.values())
        if made > held + MADE_BUFFERS_ALLOWANCE:
            raise CheckpointError(
                f"{self.path}: its {self.config_type} config describes {made / 2**20:,.0f} MiB "
                f"of buffers the model makes itself, against {held / 2**20:,.1f} MiB of "
                "tensors in the file: an edited config?"
            )

    def _state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def load_into(
        self, module: torch.nn.Module, prefix: str = "", missing_ok: Collection[str] = ()
    ) -> list[str]:
        """Copy the tensors under ``prefix`` into ``module``; every parameter and buffer must
        be present with the same shape, and no tensor may be left over. Names in
        ``missing_ok`` (parts a fine-tune adds to a trained model) may be absent: they keep
        the module's values, and the list of those absent is returned."""
        state = self._state(prefix)
        absent = self._check_fits(module, state, missing_ok)
        state.update({k: v for k, v in module.state_dict().items() if k in absent})
        module.load_state_dict(state, strict=True)
        return absent

    def check_fits(
        self, module: torch.nn.Module, prefix: str = "", missing_ok: Collection[str] = ()
    ) -> None:
        """Refuse (CheckpointError) what ``load_into`` would refuse, without copying: ``module``
        may be made on the meta device, so a mismatch is named before anything is built."""
        self._check_fits(module, self._state(prefix), missing_ok)

    def _check_fits(
        self, module: torch.nn.Module, state: dict[str, torch.Tensor], missing_ok: Collection[str]
    ) -> list[str]:
        """The names in ``missing_ok`` absent from ``state``; a CheckpointError if ``state``
        does not fit ``module`` otherwise (names, shapes, kinds of dtype)."""
        state = dict(state)
        expected = module.state_dict()
        absent = sorted((set(expected) - set(state)) & set(missing_ok))
        state.update({k: expected[k] for k in absent})
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(state) & set(expected))
            if state[k].shape != expected[k].shape
        ]
        # A float file tensor in an int buffer (a step counter, ids) was truncated without a
        # word, and the reverse rounds; floats of another precision (bf16 weights) are fine.
        wrong += [
            f"{k}: file {state[k].dtype} vs model {expected[k].dtype}"
            for k in sorted(set(state) & set(expected))
            if _dtype_kind(state[k]) != _dtype_kind(expected[k])
        ]
        # NaN or inf weights (an edited file: training stops before making any) loaded and
        # made black videos; a tensor of the meta device (``build``'s probe) has no values.
        # In the model's dtype: a float64 1e300 is finite and loads as inf in float32.
        infinite = [
            k
            for k in sorted(set(state) & set(expected))
            if state[k].is_floating_point()
            and state[k].device.type != "meta"
            and not bool(torch.isfinite(_as_model_dtype(state[k], expected[k])).all())
        ]
        if infinite and not (missing or unexpected or wrong):
            raise NonFiniteWeights(
                f"{self.path} holds NaN or inf weights (an edited file, or a run that "
                f"diverged): {', '.join(infinite[:4])}" + (" ..." if len(infinite) > 4 else "")
            )
        if missing or unexpected or wrong or infinite:
            raise CheckpointError(
                f"{self.path} does not fit {type(module).__name__} (wrong architecture or "
                f"size?): {_summary('missing', missing)}{_summary('unexpected', unexpected)}"
                f"{_summary('shape or dtype mismatch', wrong)}"
                f"{_summary('not finite', infinite)}".rstrip("; ")
            )
        return absent


def probe_cache_dir() -> Path | None:
    """Where ``Checkpoint.build`` remembers the files that passed its meta-device probe:
    ``$VIDGEN_CACHE_DIR/probed``, else ``$XDG_CACHE_HOME/vidgen/probed`` (default
    ``~/.cache``); None (no memory: every build probes) when ``VIDGEN_CACHE_DIR=off`` or no
    home directory can be found. Its markers count only while the folder is this user's
    and no one else can write to it."""
    root = os.environ.get("VIDGEN_CACHE_DIR", "")
    if root.lower() == "off":
        return None
    try:
        if not root:
            base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            root = os.path.join(base, "vidgen")
        return expand_user(root) / "probed"
    except RuntimeError:  # no home directory to be found (for ~ or the default)
        return None


def _own_folder(folder: Path) -> bool:
    """``folder`` is this user's and only they can write to it: a marker anyone else could
    have made would let a hostile file past the probe."""
    geteuid = getattr(os, "geteuid", None)  # none on Windows: no memory there
    try:
        st = os.stat(folder)
    except OSError:
        return False
    return geteuid is not None and st.st_uid == geteuid() and not st.st_mode & 0o022


def _remembered(marker: Path) -> bool:
    """``marker`` exists in a folder of this user's own (an unreadable folder: no)."""
    try:
        return marker.is_file() and _own_folder(marker.parent)
    except OSError:  # a folder this user may not enter
        return False


@functools.lru_cache(maxsize=64)
def _code_digest(module_name: str) -> str:
    """sha256 of a module's source file ("" when it has none): a model's code that changed
    (an editable install, another commit) is probed again."""
    module = sys.modules.get(module_name)
    source = getattr(module, "__file__", None)
    if not source:
        return ""
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except OSError:
        return ""


def _probe_marker(sha256: str, factory: Callable[..., Any], config_cls: type) -> Path | None:
    """The marker of a file's bytes probed as made by the class ``factory``, its code and
    this torch; None for any other callable (two lambdas, or partials, could share a name
    and make models of other sizes: those are probed every time)."""
    folder = probe_cache_dir()
    if folder is None or not isinstance(factory, type):
        return None
    key = "\0".join(
        [
            sha256,
            vidgen.__version__,
            torch.__version__,
            _type_name(config_cls),
            f"{factory.__module__}.{factory.__qualname__}",
            _code_digest(factory.__module__),
        ]
    )
    return folder / hashlib.sha256(key.encode()).hexdigest()


def _as_model_dtype(tensor: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``load_state_dict`` copies it into ``model``'s floating tensor."""
    if model.is_floating_point() and tensor.dtype != model.dtype:
        return tensor.to(model.dtype)
    return tensor


def _dtype_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "complex" if t.is_complex() else "float" if t.is_floating_point() else "int"


def save(
    path: str | os.PathLike,
    tensors: torch.nn.Module | Mapping[str, torch.Tensor],
    config: Any,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` (a module's state dict, or any name -> tensor mapping) with ``config``
    (a dataclass instance) and a model ``card`` (JSON-serialisable) to ``path`` atomically."""
    path = expand_user(path)  # as load reads it: "~/a.safetensors" made a folder named "~"
    if path.suffix != SUFFIX:
        raise ValueError(f"checkpoint path must end in {SUFFIX}, got {str(path)!r}")
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    state = tensors.state_dict() if isinstance(tensors, torch.nn.Module) else dict(tensors)
    state = _detached(state)
    metadata = _metadata(_type_name(type(config)), dataclasses.asdict(config), card or {})
    return _write(path, state, metadata)


def _metadata(
    config_type: str,
    config: Mapping[str, Any],
    card: Mapping[str, Any],
    format_version: int | None = None,
    vidgen_version: str | None = None,
) -> dict[str, str]:
    """The header of a checkpoint (this vidgen's format and version unless given)."""
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if format_version is None else format_version),
        "vidgen_version": vidgen.__version__ if vidgen_version is None else vidgen_version,
        "config_type": config_type,
        "config": json.dumps(dict(config), sort_keys=True),
        "card": json.dumps(_str_keys(dict(card), "card"), sort_keys=True, default=str),
    }


def _str_keys(value: Any, where: str) -> Any:
    """``value`` with every mapping key checked to be a str (JSON objects have no others:
    keys of mixed types failed deep in json.dumps, naming nothing)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} keys must be str, got {key!r} ({type(key).__name__})")
            _str_keys(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _str_keys(item, f"{where}[{i}]")
    return value


def _write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    try:  # before the temp file (and the folders it makes): a refused save leaves nothing
        _check_saveable(state)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{path}: {err}") from None
    metadata = {**metadata, "digest": _digest(metadata, state)}
    # Written into our own temp file, tensor by tensor: safetensors' save_file writes a temp
    # file of its own (".tmpXXXXXX", mode 0600) that a kill left behind for good, under a name
    # no cleanup can tell from anything else's, and its ``save`` builds the whole file in
    # memory first (one more copy of every weight).
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            write_safetensors(f, state, metadata)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# safetensors' dtype names, in the order its writer lays tensors out (widest first, so every
# tensor's bytes are aligned to its item size after the 8-byte-aligned header).
_SAFETENSORS_DTYPES = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses to read a larger header
# Far more than any model here has (the xl DiT: a few hundred). A header of 200,000 empty
# tensors cost 200 MB and 4 s of building views before the file was refused as no vidgen's.
MAX_TENSORS = 100_000
_LAYOUT_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}


def _check_saveable(state: Mapping[str, torch.Tensor]) -> None:
    """TypeError or ValueError unless every tensor can be written as it is."""
    for name, t in state.items():
        if not isinstance(name, str):  # int names came back as str; mixed ones failed a sort
            raise TypeError(f"tensor names must be str, got {name!r} ({type(name).__name__})")
        if name == "__metadata__":  # the header's own key: it would replace the metadata
            raise ValueError("a tensor cannot be named '__metadata__'")
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensors[{name!r}]: dtype {t.dtype} cannot be saved")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensors[{name!r}] must be a contiguous CPU tensor")


def write_safetensors(
    f: Any, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write CPU-contiguous ``state`` with string ``metadata`` to the binary file ``f`` in the
    safetensors format, one tensor at a time: the layout of ``safetensors.torch.save`` (whose
    metadata comes out in hash order; here in the order given, so a file is reproducible)."""
    _check_saveable(state)
    names = sorted(state, key=lambda n: (_LAYOUT_RANK[state[n].dtype], n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = state[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:  # written, it could never be loaded
        raise ValueError(
            f"the checkpoint's header (config, card and tensor names) would be {len(raw):,} "
            f"bytes; safetensors reads at most {MAX_HEADER_BYTES:,}: keep the card smaller"
        )
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in names:
        t = state[name]
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def map_safetensors(buffer: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file held in ``buffer`` (a writable buffer: a
    private ``mmap`` of the file, or a bytearray), checked as safetensors checks them: one
    JSON header, every tensor's dtype known, its bytes the size of its shape, the tensors
    tiling the data exactly. The tensors are views of ``buffer``, not copies (a tensor whose
    bytes are not aligned to its item size is copied): loading a mapped file costs page
    cache, which the kernel may drop, not memory of the process's own. ValueError if the
    buffer is no safetensors file."""
    view = memoryview(buffer)
    if len(view) < 8:
        raise ValueError(f"{len(view)} bytes: shorter than a safetensors header")
    (size,) = struct.unpack("<Q", view[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(view):
        raise ValueError(f"header of {size:,} bytes in a file of {len(view):,} (truncated?)")
    try:
        header = json.loads(bytes(view[8 : 8 + size]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the header is not UTF-8 JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("the header's __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise ValueError(f"the header lists {len(header):,} tensors, more than {MAX_TENSORS:,}")
    start, data_len = 8 + size, len(view) - 8 - size
    layout = []
    for name, entry in header.items():
        code = entry.get("dtype") if isinstance(entry, dict) else None
        dtype = _TORCH_DTYPES.get(code) if isinstance(code, str) else None
        shape, offsets = (entry.get(k) if dtype else None for k in ("shape", "data_offsets"))
        if (
            dtype is None
            or not isinstance(shape, list)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(map(_is_size, [*shape, *offsets]))
        ):
            raise ValueError(
                f"tensor {name!r}: unreadable entry {_short(entry)} (a known dtype, a shape and "
                "two data offsets of non-negative integers)"
            )
        begin, end = offsets
        if end < begin:
            raise ValueError(f"tensor {name!r}: data offsets {offsets} run backwards")
        numel = 1
        for d in shape:
            numel *= d
        if numel * dtype.itemsize != end - begin:
            raise ValueError(
                f"tensor {name!r}: {end - begin} bytes for shape {shape} of {entry['dtype']}"
            )
        layout.append((begin, end, name, dtype, shape, numel))
    layout.sort(key=lambda item: item[:2])
    at = 0
    for begin, end, name, *_ in layout:
        if begin != at:  # a gap or an overlap
            raise ValueError(f"tensor {name!r}: data starts at {begin}, expected {at}")
        at = end
    if at != data_len:
        raise ValueError(f"the tensors cover {at:,} bytes of {data_len:,} (truncated?)")
    tensors = {}
    for begin, _, name, dtype, shape, numel in layout:
        offset = start + begin
        try:
            if numel == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
            elif offset % dtype.itemsize:  # unaligned (not from vidgen's writer): copied
                raw = bytearray(view[offset : offset + numel * dtype.itemsize])
                tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape)
            else:
                flat = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=offset)
                tensors[name] = flat.reshape(shape)
        except (RuntimeError, TypeError, OverflowError) as err:  # e.g. shape [0, 2**62, 8]
            raise ValueError(f"tensor {name!r}: shape {shape}: {err}") from None
    return tensors, metadata


def _is_size(value: Any) -> bool:
    """A JSON integer usable as a dimension or offset (not a bool, a float or a string)."""
    return type(value) is int and 0 <= value < 2**63


def update_card(
    name_or_path: str | os.PathLike,
    changes: Mapping[str, Any],
    out: str | os.PathLike | None = None,
) -> Path:
    """Write the checkpoint again (to ``out``, default in place, atomically) with its card's
    keys updated from ``changes``; tensors and config are kept as they are. For example a
    generator trained against a tokenizer file elsewhere, shipped beside it:
    ``update_card(path, {"tokenizer": "larp-tiny"})`` (its ``tokenizer_fingerprint`` still
    guards the pairing)."""
    ckpt = load(name_or_path)
    path = ckpt.path if out is None else expand_user(out)
    if path.suffix != SUFFIX:
        if out is None:  # load takes any file name; the message named an out never given
            raise ValueError(
                f"cannot rewrite {str(path)!r} in place: it does not end in {SUFFIX}; "
                f"pass out= a path that does"
            )
        raise ValueError(f"out must end in {SUFFIX}, got {str(path)!r}")
    card = {**ckpt.card, **changes}
    metadata = _metadata(
        ckpt.config_type, ckpt.config, card, ckpt.format_version, ckpt.vidgen_version
    )
    return _write(path, dict(ckpt.tensors), metadata)


def load(name_or_path: str | os.PathLike, expected_config: type | None = None) -> Checkpoint:
    """Load and verify a checkpoint (a shipped name or a path); with ``expected_config``,
    refuse a checkpoint whose config is of another type."""
    path = resolve(name_or_path)
    # Mapped, not read: the tensors are views of the file's pages (page cache the kernel can
    # drop), so a model built from them costs its own size, not twice that (a read file, then
    # its tensors). One mapping: the sha256 recorded as provenance is that of the very bytes
    # loaded, even if the file is replaced meanwhile (a training run re-exporting it: a new
    # file renamed over it, the mapping keeps the old). Private (copy on write): a tensor
    # changed in place changes neither the file nor other loads. vidgen replaces files by
    # renames only; a file rewritten in place (``cp`` over it) while its tensors are in use
    # would change them, and one truncated would kill the process (SIGBUS) when read.
    data = None
    try:
        data = _map(path)
        tensors, metadata = map_safetensors(data)
    except (OSError, ValueError, RecursionError) as err:
        if isinstance(data, mmap.mmap):  # the traceback would hold it (and its fd) open
            with contextlib.suppress(BufferError):  # unless a tensor made still views it
                data.close()
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated?): {err}") from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a vidgen checkpoint")
    version = _format_version(path, metadata.get("format_version"))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}; this vidgen reads up to {FORMAT_VERSION}"
            " (upgrade vidgen)"
        )
    stored = metadata.pop("digest", None)
    if stored != _digest(metadata, tensors):
        raise CheckpointError(
            f"{path} does not match its stored digest: the file was corrupted or modified"
        )
    try:
        ckpt = Checkpoint(
            path=path,
            config_type=metadata["config_type"],
            config=json.loads(metadata["config"]),
            card=json.loads(metadata["card"]),
            tensors=tensors,
            format_version=version,
            vidgen_version=metadata["vidgen_version"],
            sha256=hashlib.sha256(memoryview(data)).hexdigest(),
        )
    except (KeyError, ValueError, RecursionError) as err:  # a digest made over an edited header
        raise CheckpointError(f"{path} has a missing or unreadable header field: {err}") from None
    for key in ("config", "card"):  # callers index both as dicts
        value = getattr(ckpt, key)
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{path} has an unreadable header field {key!r}: expected a JSON object, got "
                f"{_short(value)}"
            )
    if expected_config is not None and _type_name(expected_config) != ckpt.config_type:
        raise CheckpointError(
            f"{path} holds a {ckpt.config_type} checkpoint, expected {_type_name(expected_config)}"
        )
    return ckpt


def _map(path: Path) -> Any:
    """The file's bytes as a private writable mapping (an empty file: an empty bytearray,
    which mmap cannot map)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return bytearray()
        try:  # Python 3.13+: the mapping keeps no file descriptor of its own
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY, trackfd=False)
        except TypeError:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _format_version(path: Path, text: object) -> int:
    """The header's format version: decimal digits, at least 1 (``int`` alone would take
    "-5", " 1" or "1_0")."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        got = "nothing" if text is None else _short(text)
        raise CheckpointError(
            f"{path} has an unreadable header field 'format_version': expected an integer >= 1,"
            f" got {got}"
        )
    return int(text)


def _header(name_or_path: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    path = resolve(name_or_path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated?): {err}") from err
    if metadata.get("format") != FORMAT or "config_type" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a vidgen checkpoint")
    return path, metadata


def config_type(name_or_path: str | os.PathLike) -> str:
    """The config type a checkpoint holds, read from its header alone (no tensors loaded, no
    digest checked: ``load`` verifies the file when it is used)."""
    return _header(name_or_path)[1]["config_type"]


@dataclass(frozen=True)
class Header:
    """What a checkpoint's header says, read alone as ``config_type`` is (unverified;
    a ``config`` or ``card`` that is not a JSON object comes back empty)."""

    path: Path
    config_type: str
    config: dict[str, Any]
    card: dict[str, Any]


def read_header(name_or_path: str | os.PathLike) -> Header:
    """A checkpoint's header in one read: for checks that need its type and its card (a
    manifest's every item), without reading the file once for each."""
    path, metadata = _header(name_or_path)
    fields = []
    for key in ("config", "card"):
        try:
            value = json.loads(metadata.get(key, "{}"))
        except (ValueError, RecursionError):  # nested past Python's limit: unreadable too
            value = {}
        fields.append(value if isinstance(value, dict) else {})
    return Header(path, metadata["config_type"], fields[0], fields[1])


def assets_dir() -> Path:
    """The folder of shipped checkpoints (package data)."""
    return Path(str(resources.files("vidgen.assets")))


def available() -> list[str]:
    """Names of the shipped checkpoints."""
    return sorted(p.name[: -len(SUFFIX)] for p in assets_dir().glob(f"*{SUFFIX}"))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A shipped checkpoint's name (``larp-tiny``) or a path -> the path of an existing file."""
    text = os.fspath(name_or_path)
    path = expand_user(text)
    looks_like_path = isinstance(name_or_path, os.PathLike) or "/" in text or text.endswith(SUFFIX)
    # A bare name means a shipped checkpoint even if a file of that name is in the cwd.
    if not looks_like_path and _NAME.match(text):
        shipped = assets_dir() / f"{text}{SUFFIX}"
        if shipped.is_file():
            return shipped
        raise CheckpointError(f"no shipped checkpoint named {text!r}{_shipped_hint(text)}")
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as err:  # a name too long for the filesystem (ENAMETOOLONG), ...
        raise CheckpointError(f"checkpoint path {text!r} cannot be read: {err.strerror}") from None
    if is_file:
        return path
    if is_dir:
        found = sorted(p.name for p in path.glob(f"*{SUFFIX}"))[:5]
        raise CheckpointError(
            f"{text!r} is a folder, not a checkpoint file"
            + (f" (it holds {', '.join(found)})" if found else "")
        )
    if not looks_like_path:  # a name, but not one of ours ("CA2VDM-TINY", "my model")
        raise CheckpointError(
            f"no shipped checkpoint named {text!r} and no file of that name{_shipped_hint(text)}"
        )
    if "/" not in text and _near_shipped(text) is not None:  # "CA2VDM-TINY.safetensors"
        raise CheckpointError(
            f"checkpoint file {text!r} does not exist; for a shipped checkpoint give its name"
            f"{_shipped_hint(text, paths_note=False)}"
        )
    raise CheckpointError(f"checkpoint file {text!r} does not exist")


def spelled(name_or_path: str | os.PathLike) -> str:
    """``name_or_path`` as text that ``resolve`` reads the same way: a path object whose text
    looks like a shipped name (``Path("ca2vdm-tiny")``, a local file) gains ``./``, so that
    it is not taken for the shipped checkpoint once it is a string."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) and _is_name(text):
        return os.path.join(os.curdir, text)
    return text


def _is_name(text: str) -> bool:
    """A shipped checkpoint's name as ``resolve`` reads it (no /, no suffix)."""
    return "/" not in text and not text.endswith(SUFFIX) and bool(_NAME.match(text))


def companion(name_or_path: str | os.PathLike, owner: str | os.PathLike) -> str:
    """What to load for a checkpoint that another one (``owner``, a file) names: its card's
    ``tokenizer``, a LARP's ``autoencoder``. A shipped name stays as it is; a relative path
    is looked up beside ``owner`` first (where ``named_from`` writes them from), then from
    the working directory (cards written before, relative to where training ran)."""
    if not isinstance(name_or_path, str | os.PathLike):
        raise CheckpointError(
            f"{owner} names the checkpoint to load with it (its card's 'tokenizer' or its "
            f"config's 'autoencoder') as {name_or_path!r}: expected a shipped name or a path"
        )
    text = spelled(name_or_path)
    if _is_name(text) or expand_user(text).is_absolute():
        return text
    # The folder as given, then the real one: named_from writes the name from the real
    # folder, so a generator reached through a symlink elsewhere finds it there.
    for folder in (Path(owner).parent, Path(os.path.realpath(owner)).parent):
        beside = folder / text
        if beside.is_file():
            return str(beside)
    return text


def named_from(name_or_path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """How a checkpoint saved in ``folder`` names another: a shipped name as it is, a file
    by its path relative to ``folder`` (``companion`` finds it there from any working
    directory, and the two folders can move together)."""
    text = spelled(name_or_path)
    if _is_name(text):
        return text
    target = expand_user(text).resolve()
    return os.path.relpath(target, Path(folder).resolve())


def _near_shipped(text: str) -> str | None:
    """The shipped name ``text`` differs from only in case or by the file suffix, if any."""
    stem = text[: -len(SUFFIX)] if text.lower().endswith(SUFFIX) else text
    return next((name for name in available() if name.lower() == stem.lower()), None)


def _shipped_hint(text: str, paths_note: bool = True) -> str:
    """The tail of a resolve error: the shipped name ``text`` was likely meant to be, and
    all the shipped names."""
    near = _near_shipped(text)
    mean = f"; did you mean {near!r}?" if near else ""
    names = ", ".join(available()) or "none"
    note = f" (paths need a / or the {SUFFIX} suffix)" if paths_note else ""
    return f"{mean}; shipped: {names}{note}"


def same_checkpoint(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two names or paths name one checkpoint file (a shipped name and its path are
    one; names this machine cannot resolve, e.g. through a Ray client, must be equal)."""
    if spelled(a) == spelled(b):
        return True
    try:
        return resolve(a).resolve() == resolve(b).resolve()
    except CheckpointError:
        return False


def combined_sha256(digests: Sequence[str]) -> str:
    """One sha256 over hex sha256s, in order (a generator's companion files, from the
    digests their loads computed, ``Checkpoint.sha256``): the ``tokenizer.sha256`` of
    render guards and provenance."""
    digest = hashlib.sha256()
    for hex_digest in digests:
        digest.update(hex_digest.encode())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _detached(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage (safetensors refuses shared
    storage; tied weights are saved twice and tied again by the module on load)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor)}")
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.numel() < t.untyped_storage().nbytes() // max(t.element_size(), 1):
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


def _digest(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(dict(metadata), sort_keys=True).encode())
    return _hash_tensors(digest, tensors).hexdigest()


def _hash_tensors(digest: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """``digest`` (hashlib) updated with each tensor's name, dtype, shape and bytes, by name."""
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the bytes in place, not a copy
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest


def fingerprint(tensors: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> str:
    """Hex sha256 (first 16) of named tensors (dtype, shape and values) and JSON ``settings``:
    what identifies the part of a model another model was trained against (a tokenizer's
    encode path), independent of the file it sits in and of the parts it leaves out."""
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    return _hash_tensors(digest, tensors).hexdigest()[:16]


def module_fingerprint(
    module: torch.nn.Module,
    prefixes: tuple[str, ...],
    config: Any,
    fields: tuple[str, ...],
    **extra: Any,
) -> str:
    """``fingerprint`` of ``module``'s tensors whose names start with one of ``prefixes``, and
    of the ``fields`` of ``config`` with ``extra`` settings."""
    tensors = {k: v for k, v in module.state_dict().items() if k.startswith(prefixes)}
    return fingerprint(tensors, {**extra, **{name: getattr(config, name) for name in fields}})


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _summary(what: str, items: list[str], limit: int = 5) -> str:
    if not items:
        return ""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{what}: {', '.join(items[:limit])}{more}; "


def _from_dict(cls: type[C], data: Mapping[str, Any], where: str = "") -> C:
    """Rebuild a (possibly nested) dataclass from ``dataclasses.asdict`` output, each value
    checked against its field's type hint (the digest proves only that whoever wrote the file
    could hash it). Keys the dataclass does not have (a newer file) are refused rather than
    silently dropped; fields the file lacks (an older file) keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    label, prefix = (f"config field {where}", f"{where}.") if where else ("config", "")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(f"{label} has fields {cls.__name__} does not know: {unknown}")
    required = {
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise CheckpointError(f"{label} lacks fields {cls.__name__} requires: {missing}")
    kwargs = {name: _checked(f"{prefix}{name}", hints[name], value) for name, value in data.items()}
    return cls(**kwargs)


def _checked(name: str, hint: Any, value: Any) -> Any:
    """``value`` (from JSON) as the field ``name`` of type ``hint`` holds it: lists become
    tuples where the hint is a tuple, objects become nested dataclasses. Hints JSON cannot
    hold (a file with them could not have been saved) are left to the dataclass."""
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is types.UnionType or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _checked(name, option, value)
            except _FieldError as err:
                if err.field != name and len(args) == 2:  # X | None: X's error is inside it
                    raise
        raise _field_error(name, hint, value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, Mapping):
            raise _field_error(name, hint, value)
        return _from_dict(hint, value, name)
    if isinstance(hint, type) and hint in _SCALARS:
        # bool is an int, but true is no count; an int is a float (JSON writes 4.0 as 4 only
        # if it was an int, and the value is kept as it was: fingerprints hash it).
        ok = isinstance(value, (int, float) if hint is float else hint)
        if not ok or (hint is not bool and isinstance(value, bool)):
            raise _field_error(name, hint, value)
        return value
    if hint is type(None):
        if value is not None:
            raise _field_error(name, hint, value)
        return None
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise _field_error(name, hint, value)
        return value
    if origin in (tuple, list, dict):
        return _checked_items(name, hint, value)
    return value


def _checked_items(name: str, hint: Any, value: Any) -> Any:
    """``_checked`` for a tuple, list or dict hint: the container, then each item."""
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _field_error(name, hint, value)
        key_hint, inner = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            key = _json_key(name, key_hint, k)
            out[key] = _checked(f"{name}[{key!r}]", inner, v)
        return out
    if not isinstance(value, (list, tuple)):
        raise _field_error(name, hint, value)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _field_error(name, hint, value)
        items = args
    else:
        items = (args[0] if args else Any,) * len(value)
    out = [
        _checked(f"{name}[{i}]", h, v) for i, (h, v) in enumerate(zip(items, value, strict=True))
    ]
    return tuple(out) if origin is tuple else out  # JSON has no tuples


def _json_key(name: str, hint: Any, key: Any) -> Any:
    """A dict key as its field declares it: JSON writes every key as a string, so an int key
    comes back as its decimal digits (exactly: "01" or "1.0" is no int key)."""
    if hint is int and not isinstance(key, bool):
        if isinstance(key, int):
            return key
        if isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key) and str(int(key)) == key:
            return int(key)
        raise CheckpointError(f"config field {name} has key {key!r}, expected int keys")
    return key


_SCALARS = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


def _expected(hint: Any) -> str:
    """What a value of type ``hint`` looks like in JSON, for errors."""
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if isinstance(hint, type) and hint in _SCALARS:
        return _SCALARS[hint]
    if hint is type(None):
        return "null"
    if origin is types.UnionType or origin is typing.Union:
        return " or ".join(_expected(a) for a in args)
    if dataclasses.is_dataclass(hint):
        return f"an object ({hint.__name__})"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} ({', '.join(_expected(a) for a in args)})"
    if origin in (tuple, list):
        return f"a list (each {_expected(args[0])})" if args else "a list"
    if origin is dict:
        return "an object"
    return getattr(hint, "__name__", str(hint))


class _FieldError(CheckpointError):
    """A config value that does not fit its field's type hint."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _field_error(name: str, hint: Any, value: Any) -> _FieldError:
    message = f"config field {name} must be {_expected(hint)}, got {_short(value)}"
    return _FieldError(message, name)


def _short(value: Any, limit: int = 80) -> str:
    """``value`` as JSON (else its repr), cut to ``limit`` characters: a forged header can
    hold anything."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."

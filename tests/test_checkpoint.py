import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from vidgen import checkpoint
from vidgen.checkpoint import CheckpointError
from vidgen.validate import check_int, check_number


@dataclass
class Inner:
    depth: int = 2
    widths: tuple[int, int] = (4, 8)


@dataclass
class TinyConfig:
    dim: int = 8
    inner: Inner = field(default_factory=Inner)
    label: int | None = None


@dataclass
class OtherConfig:
    dim: int = 8


def make_model(dim: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.LayerNorm(dim))
    model.register_buffer("steps", torch.tensor([3], dtype=torch.int64))
    return model


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save(path, make_model(), TinyConfig(label=3), card={"data": "bouncing", "steps": 5})
    return path


def test_round_trip(saved):
    ckpt = checkpoint.load(saved, expected_config=TinyConfig)
    assert ckpt.config_as(TinyConfig) == TinyConfig(label=3)
    assert ckpt.card == {"data": "bouncing", "steps": 5}
    assert ckpt.format_version == checkpoint.FORMAT_VERSION
    assert ckpt.sha256 == checkpoint.file_sha256(saved)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    fresh.register_buffer("steps", torch.tensor([0], dtype=torch.int64))
    ckpt.load_into(fresh)
    for (name, a), b in zip(
        make_model().state_dict().items(), fresh.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_scalar_tensors_are_saved(tmp_path):
    model = torch.nn.BatchNorm1d(3)  # its num_batches_tracked buffer is 0-dimensional
    model.register_parameter("temperature", torch.nn.Parameter(torch.tensor(0.7)))
    checkpoint.save(tmp_path / "bn.safetensors", model, OtherConfig())
    fresh = torch.nn.BatchNorm1d(3)
    fresh.register_parameter("temperature", torch.nn.Parameter(torch.tensor(1.0)))
    checkpoint.load(tmp_path / "bn.safetensors").load_into(fresh)
    assert fresh.temperature.item() == pytest.approx(0.7)


def test_newer_format_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", checkpoint.FORMAT_VERSION + 1)
    checkpoint.save(tmp_path / "new.safetensors", make_model(), OtherConfig())
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="format version 2.*upgrade"):
        checkpoint.load(tmp_path / "new.safetensors")


def test_tied_weights_are_saved(tmp_path):
    model = torch.nn.Linear(4, 4, bias=False)
    tied = {"a.weight": model.weight, "b.weight": model.weight}
    checkpoint.save(tmp_path / "tied.safetensors", tied, OtherConfig())
    ckpt = checkpoint.load(tmp_path / "tied.safetensors")
    assert torch.equal(ckpt.tensors["a.weight"], ckpt.tensors["b.weight"])


def test_wrong_architecture(saved):
    ckpt = checkpoint.load(saved)
    with pytest.raises(CheckpointError, match="dtype mismatch.*0.weight"):
        ckpt.load_into(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)))
    bigger = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
    )
    with pytest.raises(CheckpointError, match=r"missing: 2\.bias, 2\.weight; unexpected: steps"):
        ckpt.load_into(bigger)
    with pytest.raises(CheckpointError, match="OtherConfig"):
        checkpoint.load(saved, expected_config=OtherConfig)
    with pytest.raises(CheckpointError, match="not a .*OtherConfig"):
        ckpt.config_as(OtherConfig)


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (4, 100, len(data) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}"):
            checkpoint.load(bad)


def test_tampered_tensor_bytes(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        checkpoint.load(bad)


def test_tampered_metadata(saved, tmp_path):
    data = saved.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n]
    claim = b'\\"steps\\": 5'  # inside the card, JSON-escaped within the header's JSON
    assert header.count(claim) == 1
    edited = header.replace(claim, b'\\"steps\\": 9')  # same length: still a valid file
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(data[:8] + edited + data[8 + n :])
    assert json.loads(edited)  # the edit kept the header well-formed
    with pytest.raises(CheckpointError, match="digest"):
        checkpoint.load(bad)


@pytest.mark.parametrize("edit", ["drop card", "bad config json"])
def test_a_header_edited_with_its_digest_recomputed_is_a_checkpoint_error(saved, tmp_path, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(saved, framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    metadata.pop("digest")
    if edit == "drop card":
        metadata.pop("card")
    else:
        metadata["config"] = "{not json"
    metadata["digest"] = checkpoint._digest(metadata, tensors)
    bad = tmp_path / "edited.safetensors"
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(CheckpointError, match="missing or unreadable header field"):
        checkpoint.load(bad)


def test_the_recorded_sha256_is_that_of_the_bytes_loaded(saved, tmp_path, monkeypatch):
    """A file replaced while it is loaded (a training run re-exporting it: a new file renamed
    over it) must not give one file's tensors under the other's sha256 as provenance: the
    tensors and the sha256 come from the one mapping of the file opened."""
    original = saved.read_bytes()
    other = checkpoint.save(tmp_path / "other.safetensors", make_model(4), OtherConfig(dim=4))
    real = checkpoint.map_safetensors

    def replaced_meanwhile(buffer):
        os.replace(other, saved)  # the path now names another file
        return real(buffer)

    monkeypatch.setattr(checkpoint, "map_safetensors", replaced_meanwhile)
    monkeypatch.setattr(checkpoint, "file_sha256", lambda path: pytest.fail("read again"))
    ckpt = checkpoint.load(saved)
    assert ckpt.sha256 == hashlib.sha256(original).hexdigest()
    assert ckpt.config_type.endswith("TinyConfig") and saved.read_bytes() != original


def test_combined_sha256_is_the_hash_render_guards_recorded(saved, tmp_path):
    """The sha256 of the files' hex sha256s in order, as render folders' tokenizer guards
    were written (hashing the files themselves) before actors took the loads' digests."""
    other = checkpoint.save(tmp_path / "other.safetensors", make_model(4), OtherConfig(dim=4))
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (saved, other)]
    recorded = hashlib.sha256("".join(digests).encode()).hexdigest()
    assert checkpoint.combined_sha256(digests) == recorded
    assert checkpoint.combined_sha256(digests[::-1]) != checkpoint.combined_sha256(digests)


def test_read_header_reads_the_header_once(saved, monkeypatch):
    """Type, config and card from one read (``check_generator`` runs on every item of a
    manifest), as ``config_type`` reads the type."""
    opened = []
    real_open = checkpoint.safe_open

    def safe_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", safe_open)
    header = checkpoint.read_header(saved)
    assert opened == [saved]
    assert header.config_type == checkpoint.config_type(saved)
    assert header.path == saved
    assert header.config["label"] == 3 and header.card == {"data": "bouncing", "steps": 5}


def test_plain_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a vidgen checkpoint"):
        checkpoint.load(tmp_path / "plain.safetensors")


def test_failed_save_keeps_the_old_file(saved, monkeypatch):
    before = saved.read_bytes()

    def boom(*args, **kwargs):
        if args and hasattr(args[0], "write"):  # part of the file is written first
            args[0].write(b"partial")
        raise OSError("disk full")

    for step in ("write_safetensors", "publish"):  # writing, or after the temp file
        with monkeypatch.context() as m:
            m.setattr(checkpoint, step, boom)
            with pytest.raises(OSError, match="disk full"):
                checkpoint.save(saved, make_model(4), TinyConfig(dim=4))
        assert saved.read_bytes() == before
        assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_resolve(saved, tmp_path, monkeypatch):
    assert checkpoint.resolve(saved) == saved
    assert checkpoint.resolve(str(saved)) == saved
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.resolve(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        checkpoint.resolve(saved.parent)  # was: "does not exist"
    with pytest.raises(CheckpointError, match="no shipped checkpoint named 'no-such-model'"):
        checkpoint.resolve("no-such-model")
    monkeypatch.setattr(checkpoint, "assets_dir", lambda: tmp_path)
    assert checkpoint.available() == ["model"]
    assert checkpoint.resolve("model") == tmp_path / "model.safetensors"
    assert checkpoint.load("model").card["steps"] == 5


def test_save_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        checkpoint.save(tmp_path / "model.pt", make_model(), TinyConfig())
    with pytest.raises(TypeError, match="dataclass"):
        checkpoint.save(tmp_path / "m.safetensors", make_model(), {"dim": 8})


def test_update_card_keeps_tensors_and_config(saved, tmp_path):
    before = checkpoint.load(saved)
    out = checkpoint.update_card(saved, {"tokenizer": "larp-tiny"}, out=tmp_path / "c.safetensors")
    after = checkpoint.load(out)  # digest verified
    assert after.card == {"data": "bouncing", "steps": 5, "tokenizer": "larp-tiny"}
    assert after.config_as(TinyConfig) == TinyConfig(label=3)
    assert after.config_type == before.config_type
    assert after.tensors.keys() == before.tensors.keys()
    assert all(torch.equal(after.tensors[k], before.tensors[k]) for k in before.tensors)
    assert checkpoint.load(saved).card == before.card  # the source is left as it was
    # In place, atomically: the same path, a changed card, nothing else beside it.
    checkpoint.update_card(saved, {"steps": 6})
    assert checkpoint.load(saved).card["steps"] == 6
    assert sorted(p.name for p in saved.parent.iterdir()) == ["c.safetensors", saved.name]
    with pytest.raises(ValueError, match="out must end in"):
        checkpoint.update_card(saved, {}, out=tmp_path / "c.pt")
    # load takes any file name: in place, the message named an `out` never given.
    renamed = saved.rename(tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match=r"cannot rewrite .*model.ckpt' in place: .*pass out="):
        checkpoint.update_card(renamed, {})


def test_save_and_update_card_expand_the_home_folder(saved, tmp_path, monkeypatch):
    """load read "~/x" as the home folder's x, save wrote it into a folder named "~" under
    the working directory: the same path typed twice named two files."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    out = checkpoint.save("~/a.safetensors", make_model(), TinyConfig())
    assert out == home / "a.safetensors" and out.is_file()
    assert checkpoint.load("~/a.safetensors").path.resolve() == out.resolve()
    assert checkpoint.update_card(saved, {}, out="~/b.safetensors") == home / "b.safetensors"
    assert not (work / "~").exists()


def test_tensor_names_must_be_strings(tmp_path):
    """Int names came back as str ("0"); int and str together failed a sort naming none."""
    for state in ({0: torch.zeros(1)}, {0: torch.zeros(1), "a": torch.zeros(1)}):
        with pytest.raises(TypeError, match=r"tensor names must be str, got 0 \(int\)"):
            checkpoint.save(tmp_path / "n.safetensors", state, TinyConfig())
    assert not list(tmp_path.iterdir())


def test_a_new_checkpoint_gets_the_mode_an_ordinary_file_would(tmp_path):
    """safetensors writes its own 0600 file and renames it over ours: every export, state
    and cache came out unreadable to the group (other users, actors sharing a folder)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path / "m.safetensors", make_model(4), TinyConfig(dim=4))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_save_killed_at_any_moment_leaves_only_files_remove_temps_takes(tmp_path):
    """safetensors' save_file wrote a temp file of its own (".tmpXXXXXX") that a killed run
    left for good; every file a save leaves now is the target or one of our temp files."""
    import signal
    import subprocess
    import sys
    import time

    from vidgen import fsutil

    folder = tmp_path / "run"
    folder.mkdir()
    script = f"""
from dataclasses import dataclass
import torch
from vidgen import checkpoint
@dataclass
class Config:
    size: int = 1
state = {{"w": torch.randn(4_000_000)}}
print("ready", flush=True)
while True:
    checkpoint.save({str(folder / "x.safetensors")!r}, state, Config())
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        seen: set[str] = set()
        end = time.monotonic() + 3.0
        while time.monotonic() < end:  # every name the saves put in the folder
            seen.update(p.name for p in folder.iterdir())
    finally:
        proc.send_signal(signal.SIGKILL)  # at whatever moment of a save
        proc.wait()
    assert "x.safetensors" in seen  # saves did finish while we watched
    strays = [n for n in seen if n != "x.safetensors" and not fsutil._TEMP_NAME.fullmatch(n)]
    assert not strays, f"files no cleanup can tell apart: {strays}"
    fsutil.remove_temps(folder)
    assert [p.name for p in folder.iterdir()] == ["x.safetensors"]


def forge(saved, tmp_path, **header: str | None):
    """A copy of ``saved`` with header fields replaced (None: dropped) and its digest
    recomputed, as anyone can (the digest has no key): only ``load``'s checks stand."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(saved, framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    metadata.pop("digest")
    for key, value in header.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    metadata["digest"] = checkpoint._digest(metadata, tensors)
    bad = tmp_path / "forged.safetensors"
    save_file(tensors, bad, metadata=metadata)
    return bad


@pytest.mark.parametrize(
    ("key", "value", "got"),
    [
        ("config", "null", "null"),  # was a bare TypeError from config_as
        ("config", "[1, 2]", r"\[1, 2\]"),
        ("card", "null", "null"),  # was loaded: ckpt.card.get failed later, in the caller
        ("card", "[1]", r"\[1\]"),
        ("format_version", "-5", '"-5"'),  # was accepted as version -5
        ("format_version", "0", '"0"'),
        ("format_version", "1_0", '"1_0"'),  # int() reads it as 10
        ("format_version", None, "nothing"),  # was read as version 0
    ],
)
def test_a_forged_header_field_of_the_wrong_kind_is_refused_by_file_and_key(
    saved, tmp_path, key, value, got
):
    bad = forge(saved, tmp_path, **{key: value})
    with pytest.raises(CheckpointError, match=rf"forged\.safetensors .*'{key}'.*got {got}$"):
        checkpoint.load(bad)


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"dim": "8"}, 'field dim must be an int, got "8"'),  # was loaded as the str "8"
        ({"dim": True}, "field dim must be an int, got true"),
        ({"dim": 8.5}, "field dim must be an int, got 8.5"),
        ({"inner": 5}, r"field inner must be an object \(Inner\), got 5"),  # was loaded as 5
        ({"inner": {"depth": "2"}}, 'field inner.depth must be an int, got "2"'),
        ({"inner": {"widths": [4]}}, r"field inner.widths must be a list of 2 \(an int, an int\)"),
        ({"inner": {"widths": [4, "8"]}}, r"field inner.widths\[1\] must be an int"),
        ({"inner": {"widths": 4}}, "field inner.widths must be a list of 2"),
        ({"label": "3"}, 'field label must be an int or null, got "3"'),
    ],
)
def test_a_forged_config_field_of_the_wrong_type_is_refused_by_name(saved, tmp_path, config, error):
    fields = {"dim": 8, "inner": {"depth": 2, "widths": [4, 8]}, "label": 3}
    bad = forge(saved, tmp_path, config=json.dumps({**fields, **config}))
    ckpt = checkpoint.load(bad)  # the header is well-formed; the config's types are not
    with pytest.raises(CheckpointError, match=rf"forged\.safetensors: config {error}"):
        ckpt.config_as(TinyConfig)


def test_a_small_file_describing_a_huge_model_is_refused_before_it_is_built(tmp_path):
    """The model was built from the file's config before its tensors were compared: a file
    of a few KB saying dim=1048576 tried to allocate 4 TB (7 GB at dim 2048, depth 24)."""
    from vidgen.models.ca2vdm import CA2VDM_CONFIGS, Ca2VDMConfig, CausalVideoDiT

    cfg = CA2VDM_CONFIGS["test"]
    small = checkpoint.save(tmp_path / "m.safetensors", CausalVideoDiT(cfg), cfg)
    config = {**dataclasses.asdict(cfg), "dim": 2**20, "heads": 2**10}
    bad = forge(small, tmp_path, config=json.dumps(config))
    ckpt = checkpoint.load(bad)
    built = []
    with pytest.raises(CheckpointError, match=r"forged\.safetensors does not fit CausalVideoDiT"):
        ckpt.build(lambda c: built.append(c.dim) or CausalVideoDiT(c), Ca2VDMConfig)
    assert built == [2**20]  # made once, on the meta device: nothing allocated
    fitting = checkpoint.load(small)
    model = fitting.build(CausalVideoDiT, Ca2VDMConfig)
    assert all(torch.equal(v, fitting.tensors[k]) for k, v in model.state_dict().items())


def test_a_config_torch_cannot_build_or_whose_own_buffers_are_huge_is_refused(tmp_path):
    """A forged config with sizes past what torch counts raised torch's own TypeError or
    RuntimeError from the meta-device probe; one asking for gigabytes of buffers the model
    makes itself (a LARP's masks and initial queries, in no file) was built anyway."""
    from vidgen.tokenizers.larp import LARP_CONFIGS, LARPConfig, LARPTokenizer

    cfg = LARP_CONFIGS["test"]
    small = checkpoint.save(tmp_path / "m.safetensors", LARPTokenizer(cfg), cfg)
    huge = {**dataclasses.asdict(cfg), "num_tokens": 2**62}
    with pytest.raises(CheckpointError, match="config describes no model torch can build"):
        checkpoint.load(forge(small, tmp_path, config=json.dumps(huge))).build(
            LARPTokenizer, LARPConfig
        )
    # 4,096 tokens: a (4096, 4096) prior mask and a (4096, 8) query init, about 16 MiB of
    # made buffers beside 0.3 MiB of weights: within the allowance; 16,384 are 256 MiB.
    made: list[int] = []

    def factory(c: LARPConfig) -> LARPTokenizer:
        made.append(c.num_tokens)
        return LARPTokenizer(c)

    for tokens, refused in ((4096, False), (16384, True)):
        config = json.dumps({**dataclasses.asdict(cfg), "num_tokens": tokens})
        ckpt = checkpoint.load(forge(small, tmp_path, config=config))
        if refused:
            with pytest.raises(CheckpointError, match=r"MiB of buffers the model makes itself"):
                ckpt.build(factory, LARPConfig)
        else:  # past the buffers' check: refused for its weights' shapes, as before
            with pytest.raises(CheckpointError, match="does not fit LARPTokenizer"):
                ckpt.build(factory, LARPConfig)
    assert made == [4096, 16384]  # each only as the meta-device probe


def test_a_file_that_passed_the_probe_is_made_at_once_next_time(tmp_path, monkeypatch):
    """The meta-device probe costs a fresh process about 2 s (torch imports torch._dynamo
    for its meta kernels), paid by every actor start: the bytes of a file that passed it
    are remembered, and only those bytes, under this vidgen and model class."""
    from vidgen.models.ca2vdm import CA2VDM_CONFIGS, Ca2VDMConfig, CausalVideoDiT

    monkeypatch.setenv("VIDGEN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = CA2VDM_CONFIGS["test"]
    one = checkpoint.save(tmp_path / "one.safetensors", CausalVideoDiT(cfg), cfg)
    other = checkpoint.save(tmp_path / "other.safetensors", CausalVideoDiT(cfg), cfg)
    devices: list[str] = []

    class Counted(CausalVideoDiT):  # the factory: a class, as the generators pass
        def __init__(self, c: Ca2VDMConfig) -> None:
            devices.append(torch.empty(0).device.type)
            super().__init__(c)

    factory = Counted

    def built(path: Path) -> list[str]:
        devices.clear()
        ckpt = checkpoint.load(path)
        model = ckpt.build(factory, Ca2VDMConfig)
        assert all(torch.equal(v, ckpt.tensors[k]) for k, v in model.state_dict().items())
        return list(devices)

    assert built(one) == ["meta", "cpu"]
    assert built(one) == ["cpu"]  # remembered
    assert built(other) == ["meta", "cpu"]  # the same config, other bytes: probed
    assert len(list((tmp_path / "cache" / "probed").iterdir())) == 2
    # A factory that is not a class (two lambdas could share a name and make models of
    # other sizes) is probed every time.
    for _ in range(2):
        devices.clear()
        checkpoint.load(one).build(lambda c: factory(c), Ca2VDMConfig)
        assert devices == ["meta", "cpu"]
    assert len(list((tmp_path / "cache" / "probed").iterdir())) == 2
    # A folder others can write to could hold their markers: not trusted.
    (tmp_path / "cache" / "probed").chmod(0o777)
    assert built(one) == ["meta", "cpu"] and built(one) == ["meta", "cpu"]
    (tmp_path / "cache" / "probed").chmod(0o700)
    assert built(one) == ["cpu"]
    # A folder this user may not enter (a HOME of another user's): probed, and built.
    real_is_file = Path.is_file

    def denied(self: Path) -> bool:
        if "probed" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", denied)
    assert built(one) == ["meta", "cpu"]
    monkeypatch.setattr(Path, "is_file", real_is_file)
    # No owner to compare (Windows has no geteuid): nothing remembered, nothing trusted.
    with pytest.MonkeyPatch.context() as patch:
        patch.delattr(os, "geteuid")
        assert built(one) == ["meta", "cpu"]
    assert built(one) == ["cpu"]
    # A forged config (the same weights, another size) is other bytes: refused on the meta
    # device, as ever, and never remembered.
    forged = forge(one, tmp_path, config=json.dumps({**dataclasses.asdict(cfg), "dim": 2**20}))
    for _ in range(2):
        devices.clear()
        with pytest.raises(CheckpointError, match="does not fit Counted"):
            checkpoint.load(forged).build(factory, Ca2VDMConfig)
        assert devices == ["meta"]
    # Off, or a cache that cannot be written: every build probes, and builds.
    monkeypatch.setenv("VIDGEN_CACHE_DIR", "off")
    assert checkpoint.probe_cache_dir() is None and built(one) == ["meta", "cpu"]
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("VIDGEN_CACHE_DIR", str(tmp_path / "file"))
    assert built(one) == ["meta", "cpu"] and built(one) == ["meta", "cpu"]


def test_a_fresh_process_loading_and_running_probed_generators_never_imports_dynamo(tmp_path):
    """What the probe's memory is for: torch._dynamo (about 2 s to import) stays out of a
    process that loads both families of generators and makes a clip with each. Any other
    import of it (a torch.compile on the serving path) shows here too."""
    import subprocess
    import sys

    from tests.models import save_test_generators

    models = save_test_generators(tmp_path / "models")
    script = f"""
import sys
from vidgen.generators import GenerationRequest, generate_video, load_generator
for model in {sorted(models.values())!r}:
    gen = load_generator(model, max_streams=1)
    clip = next(iter(generate_video(gen, GenerationRequest(model=model, frames=gen.clip_len,
                                                           seed=0, label=1, steps=2))))
    assert clip.frames.shape[0] == gen.clip_len
print("torch._dynamo" in sys.modules)
"""
    env = {**os.environ, "VIDGEN_CACHE_DIR": str(tmp_path / "cache")}
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    # The first process probed (and so imported it); the second made them at once.
    assert [r.stdout.split()[-1] for r in runs] == ["True", "False"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(saved, tmp_path, value):
    """They loaded without a word (an edited file: training stops before making any)."""
    good = checkpoint.load(saved)
    name = next(k for k, t in good.tensors.items() if t.is_floating_point())
    tensors = dict(good.tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    path = tmp_path / "bad.safetensors"
    checkpoint._write(path, tensors, checkpoint._metadata(good.config_type, good.config, good.card))
    with pytest.raises(checkpoint.NonFiniteWeights, match=rf"holds NaN or inf weights.*{name}"):
        checkpoint.load(path).load_into(make_model())


def test_float64_weights_past_the_models_range_are_refused(saved, tmp_path):
    """1e300 in a float64 tensor is finite, but loads as inf into the float32 model: the
    check read the file's dtype."""
    good = checkpoint.load(saved)
    name = next(k for k, t in good.tensors.items() if t.is_floating_point())
    tensors = dict(good.tensors)
    tensors[name] = tensors[name].double()
    path = tmp_path / "wide.safetensors"
    checkpoint._write(path, tensors, checkpoint._metadata(good.config_type, good.config, good.card))
    checkpoint.load(path).load_into(make_model())  # float64 of float32 values: fine
    tensors[name].view(-1)[0] = 1e300
    checkpoint._write(path, tensors, checkpoint._metadata(good.config_type, good.config, good.card))
    with pytest.raises(checkpoint.NonFiniteWeights, match=rf"holds NaN or inf weights.*{name}"):
        checkpoint.load(path).load_into(make_model())


@pytest.mark.parametrize(
    ("family", "config", "error"),
    [
        ("kl", {"blocks": 2**40}, "blocks must be <= 64"),
        ("larp", {"disc_layers": 2**62}, "disc_layers must be <= "),
    ],
)
def test_a_forged_depth_is_refused_before_anything_is_built(tmp_path, family, config, error):
    """A KL file saying blocks=2**40 built blocks for ever (memory growing) and a LARP one
    saying disc_layers=2**62 looped in its own config check for ever."""
    from vidgen.tokenizers.kl import KL_CONFIGS, KLAutoencoder, KLConfig
    from vidgen.tokenizers.larp import LARP_CONFIGS, LARPConfig, LARPTokenizer

    module, config_type, cfg = {
        "kl": (KLAutoencoder, KLConfig, KL_CONFIGS["test"]),
        "larp": (LARPTokenizer, LARPConfig, LARP_CONFIGS["test"]),
    }[family]
    small = checkpoint.save(tmp_path / "m.safetensors", module(cfg), cfg)
    bad = forge(small, tmp_path, config=json.dumps({**dataclasses.asdict(cfg), **config}))
    with pytest.raises(CheckpointError, match=rf"forged\.safetensors: config: .*{error}"):
        checkpoint.load(bad).build(module, config_type)


@pytest.mark.parametrize(
    ("config", "error"),
    [({"heads": 3}, "must be an even head dim"), ({"prefix_t": float("nan")}, "must be finite")],
)
def test_a_forged_config_its_own_checks_refuse_is_a_checkpoint_error(tmp_path, config, error):
    """The config's own checks raised a bare ValueError that did not name the file."""
    from vidgen.models.ca2vdm import CA2VDM_CONFIGS, Ca2VDMConfig, CausalVideoDiT

    cfg = CA2VDM_CONFIGS["test"]
    small = checkpoint.save(tmp_path / "m.safetensors", CausalVideoDiT(cfg), cfg)
    fields = {**dataclasses.asdict(cfg), **config}
    bad = forge(small, tmp_path, config=json.dumps(fields))
    with pytest.raises(CheckpointError, match=rf"forged\.safetensors: config: .*{error}"):
        checkpoint.load(bad).config_as(Ca2VDMConfig)


def test_a_header_of_too_many_tensors_is_refused_before_any_is_made(saved, monkeypatch):
    """200,000 empty tensors cost 200 MB and 4 s of views before the file was refused."""
    count = len(checkpoint.load(saved).tensors)
    monkeypatch.setattr(checkpoint, "MAX_TENSORS", count - 1)
    with pytest.raises(CheckpointError, match=f"lists {count:,} tensors, more than {count - 1:,}"):
        checkpoint.load(saved)


@pytest.mark.parametrize("key", ["config", "card"])
def test_a_header_nested_past_pythons_limit_is_a_checkpoint_error(saved, tmp_path, key):
    """json.loads raised a bare RecursionError."""
    bad = forge(saved, tmp_path, **{key: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match=r"forged\.safetensors has a missing or unread"):
        checkpoint.load(bad)
    assert checkpoint.read_header(bad).config_type  # the header alone still reads


@dataclass
class EveryKindConfig:
    """A field of each kind of hint the saved configs use."""

    count: int
    ratio: float = 0.5
    flag: bool = False
    name: str = ""
    root: str | None = None
    channels: tuple[int, int, int] = (1, 2, 3)
    sizes: tuple[int, ...] = ()
    freeze: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    per_label: dict[int, float] = field(default_factory=dict)
    inner: Inner | None = None
    anything: Any = None


def test_config_fields_of_every_kind_round_trip_with_their_types():
    config = EveryKindConfig(
        count=3,
        ratio=2,  # an int where a float is declared stays an int: fingerprints hash it
        flag=True,
        name="x",
        root="/data",
        channels=(4, 5, 6),
        sizes=(7, 8),
        freeze=["encoder"],
        weights={"a": 1.5},
        per_label={1: 0.5, -2: 2.0},  # JSON writes the keys as strings; they come back ints
        inner=Inner(depth=3, widths=(1, 2)),
        anything={"free": ["form"]},
    )
    data = json.loads(json.dumps(dataclasses.asdict(config)))  # as a file holds it
    back = checkpoint._from_dict(EveryKindConfig, data)
    assert back == config
    assert type(back.ratio) is int and type(back.channels) is tuple and type(back.sizes) is tuple
    assert type(back.freeze) is list and type(back.inner) is Inner
    assert checkpoint._from_dict(EveryKindConfig, {"count": 1}) == EveryKindConfig(count=1)
    bad = {
        "ratio": ("true", "ratio must be a number"),
        "flag": ("1", "flag must be true or false"),
        "freeze": ('["a", 2]', r"freeze\[1\] must be a string"),
        "weights": ('{"a": "x"}', r"weights\['a'\] must be a number"),
        "inner": ("[1]", r"inner must be an object \(Inner\)"),
        "per_label": ('{"01": 1.0}', r"per_label has key '01', expected int keys"),
    }
    for name, (value, error) in bad.items():
        with pytest.raises(CheckpointError, match=error):
            checkpoint._from_dict(EveryKindConfig, {"count": 1, name: json.loads(value)})
    with pytest.raises(
        CheckpointError, match=r"lacks fields EveryKindConfig requires: \['count'\]"
    ):
        checkpoint._from_dict(EveryKindConfig, {})


def test_the_configs_vidgen_saves_round_trip_through_the_type_checks():
    """Every config class a checkpoint holds, in every preset: the checks must accept all the
    types they declare (nested dataclasses, tuples, optional fields)."""
    from vidgen.data.loader import DataConfig
    from vidgen.generators.base import SnapshotInfo
    from vidgen.models.ca2vdm import CA2VDM_CONFIGS
    from vidgen.models.nbp import NBP_CONFIGS
    from vidgen.tokenizers.kl import KL_CONFIGS
    from vidgen.tokenizers.larp import LARP_CONFIGS
    from vidgen.train.encoded import EncodedClipsInfo
    from vidgen.train.loop import TrainConfig

    presets = [*CA2VDM_CONFIGS.values(), *NBP_CONFIGS.values(), *KL_CONFIGS.values()]
    presets += [
        *LARP_CONFIGS.values(),
        DataConfig(name="folder", root="/data", stride=2),
        TrainConfig(),
    ]
    presets += [SnapshotInfo(0, 1, True, "{}"), EncodedClipsInfo(clips=4, keep_video=False)]
    for config in presets:
        data = json.loads(json.dumps(dataclasses.asdict(config)))
        assert checkpoint._from_dict(type(config), data) == config


def test_a_wrong_case_or_unknown_bare_name_lists_the_shipped_names(saved, tmp_path, monkeypatch):
    """ "CA2VDM-TINY" was taken for a path and answered only "does not exist"."""
    monkeypatch.setattr(checkpoint, "assets_dir", lambda: tmp_path)  # ships "model"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(CheckpointError, match=r"'MODEL'.*did you mean 'model'\?; shipped: model"):
        checkpoint.resolve("MODEL")
    with pytest.raises(CheckpointError, match=r"'Model\.safetensors' does not exist.*'model'\?"):
        checkpoint.resolve("Model.safetensors")
    with pytest.raises(CheckpointError, match=r"named 'My Model'.*; shipped: model \(paths"):
        checkpoint.resolve("My Model")
    (tmp_path / "cwd" / "My Model").write_bytes(saved.read_bytes())
    assert checkpoint.resolve("My Model") == Path("My Model")  # a file of that name is a path
    with pytest.raises(CheckpointError, match=r"^checkpoint file './MODEL' does not exist$"):
        checkpoint.resolve("./MODEL")  # a path, plainly: no guessing


def test_check_number_refuses_an_int_too_large_for_a_float_by_name():
    """``math.isfinite`` and ``float`` raised a bare OverflowError on such an int."""
    with pytest.raises(ValueError, match=r"^x must be in \[0, 5\], got an int of about 401 digits"):
        check_number("x", 10**400, minimum=0, maximum=5)
    with pytest.raises(ValueError, match=r"^x must fit in a float .*about 401 digits"):
        check_number("x", 10**400, minimum=0)
    with pytest.raises(ValueError, match=r"^x must be <= 0, got an int of about 401"):
        check_number("x", 10**400, maximum=0)
    assert check_number("x", 10**300) == 1e300


def test_check_int_names_the_argument_of_an_int_too_long_to_print():
    """Python refuses str() of an int over 4300 digits: the message was its ValueError."""
    with pytest.raises(ValueError, match=r"^n must be >= 0, got a negative int of about 5001"):
        check_int("n", -(10**5000), minimum=0)
    assert check_int("n", 10**5000) == 10**5000


def test_a_companion_is_found_beside_its_owner_then_from_the_working_directory(
    tmp_path, monkeypatch
):
    """A card's tokenizer path was read from the working directory only: a generator
    trained on a tokenizer of its own failed to load anywhere but where it was trained."""
    owner = tmp_path / "runs" / "gen" / "gen.safetensors"
    tok = tmp_path / "runs" / "tok" / "tok.safetensors"
    for p in (owner, tok):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    named = checkpoint.named_from(tok, owner.parent)
    assert named == "../tok/tok.safetensors"
    assert checkpoint.named_from("kl-tiny", owner.parent) == "kl-tiny"  # shipped: by name
    monkeypatch.chdir(tmp_path / "runs" / "tok")
    assert Path(checkpoint.companion(named, owner)).resolve() == tok.resolve()
    assert checkpoint.companion("kl-tiny", owner) == "kl-tiny"
    assert checkpoint.companion(str(tok), owner) == str(tok)  # absolute: as it is
    # A card written before (relative to where training ran) still works from there.
    monkeypatch.chdir(tmp_path)
    assert checkpoint.companion("runs/tok/tok.safetensors", owner) == "runs/tok/tok.safetensors"
    # Reached through a symlink in another folder: the name is relative to the real one
    # (named_from resolves), and was looked up beside the link only.
    (tmp_path / "models").mkdir()
    link = tmp_path / "models" / "gen.safetensors"
    link.symlink_to(owner)
    assert Path(checkpoint.companion(named, link)).resolve() == tok.resolve()
    # A card's tokenizer that is no name: a bare TypeError naming neither file nor field.
    for bad in (None, 3):
        with pytest.raises(CheckpointError, match=r"gen.safetensors names the checkpoint .*'"):
            checkpoint.companion(bad, owner)


def test_a_tensor_of_another_kind_is_refused_and_other_float_precisions_load(tmp_path):
    """A float tensor loaded into an int64 buffer was truncated without a word (3.7 -> 3)."""
    state = make_model().state_dict()
    floats = {**state, "steps": torch.tensor([3.7])}
    checkpoint.save(tmp_path / "f.safetensors", floats, TinyConfig())
    with pytest.raises(CheckpointError, match=r"dtype mismatch.*steps: file torch.float32"):
        checkpoint.load(tmp_path / "f.safetensors").load_into(make_model())
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    checkpoint.save(tmp_path / "h.safetensors", half, TinyConfig())
    model = make_model()
    checkpoint.load(tmp_path / "h.safetensors").load_into(model)
    assert model[0].weight.dtype == torch.float32
    torch.testing.assert_close(model[0].weight, state["0.weight"], atol=1e-2, rtol=1e-2)


def test_checkpoints_are_written_tensor_by_tensor_in_safetensors_own_bytes():
    """The streaming writer (no whole-file copy in memory) lays out what
    ``safetensors.torch.save`` does: every dtype, empty and 0-d tensors, non-ASCII metadata."""
    import io

    from safetensors.torch import save

    from vidgen.checkpoint import write_safetensors

    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float64, torch.int64, torch.float32, torch.int32, torch.float16]
    dtypes += [torch.bfloat16, torch.int16, torch.int8, torch.uint8, torch.bool]
    # those safetensors' own save took before this writer, which must too
    dtypes += [torch.uint64, torch.uint32, torch.uint16, torch.complex64]
    dtypes += [torch.float8_e4m3fn, torch.float8_e5m2]
    state = {}
    for i, dtype in enumerate(dtypes):
        values = torch.randn(3, 4, generator=g) * 50
        if not (dtype.is_floating_point or dtype.is_complex):
            values = values.abs()  # unsigned kinds
        state[f"w{i:02d}"] = values.to(dtype)
        state[f"a{len(dtypes) - i:02d}"] = torch.zeros(0, 2, dtype=dtype)
        state[f"s{i:02d}"] = torch.tensor(1).to(dtype)

    def parts(data: bytes) -> tuple[dict, bytes]:  # (header, tensor bytes)
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + n]), data[8 + n :]

    for metadata in ({"card": '{"note": "ünïcode — dash\\n"}', "format": "x"}, {}):
        out = io.BytesIO()
        write_safetensors(out, state, metadata)
        # The same header (its metadata's key order is safetensors' hash order: not compared)
        # and the same tensor bytes at the same offsets.
        assert parts(out.getvalue()) == parts(save(state, metadata=metadata or None))
        assert len(out.getvalue()) == len(save(state, metadata=metadata or None))
    with pytest.raises(TypeError, match=r"tensors\['c'\]: dtype torch.complex128"):
        write_safetensors(io.BytesIO(), {"c": torch.zeros(2, dtype=torch.complex128)}, {})
    with pytest.raises(ValueError, match="a tensor cannot be named '__metadata__'"):
        write_safetensors(io.BytesIO(), {"__metadata__": torch.zeros(2)}, {})
    with pytest.raises(ValueError, match="safetensors reads at most 100,000,000"):
        write_safetensors(io.BytesIO(), {}, {"card": "x" * 100_000_001})
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        write_safetensors(io.BytesIO(), {"t": torch.zeros(4, 4).t()}, {})


def test_a_path_too_long_for_the_filesystem_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be read: File name too long"):
        checkpoint.resolve(tmp_path / ("x" * 300 + ".safetensors"))


def test_a_card_key_that_is_not_a_string_is_named(tmp_path):
    for card, where in (
        ({1: "a", "b": 2}, "card"),
        ({"runs": [{"x": 1, 2: "y"}]}, r"card\['runs'\]\[0\]"),
    ):
        with pytest.raises(TypeError, match=rf"{where} keys must be str, got"):
            checkpoint.save(tmp_path / "m.safetensors", make_model(4), TinyConfig(dim=4), card=card)
    assert not list(tmp_path.iterdir())


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status (not Linux)")


def test_a_loaded_checkpoint_maps_its_file_instead_of_copying_it(tmp_path):
    """The tensors are views of the file's pages (page cache), not copies in the process's
    own memory: a model built from them costs its own size, not twice (the read file, then
    its tensors, as until 2026-12-01). A tensor changed in place changes neither the file
    nor a second load."""
    model = torch.nn.Linear(2048, 4096, bias=False)  # 32 MiB of weights
    path = checkpoint.save(tmp_path / "big.safetensors", model, OtherConfig(dim=2048))
    digest = checkpoint.file_sha256(path)
    before = _rss_anon_mb()
    ckpt = checkpoint.load(path)
    weight = ckpt.tensors["weight"]
    assert float(weight.abs().sum()) > 0  # every page read
    assert _rss_anon_mb() - before < 8, "the tensors were copied into process memory"
    assert torch.equal(weight, model.weight.detach())
    weight.zero_()
    assert checkpoint.file_sha256(path) == digest
    assert torch.equal(checkpoint.load(path).tensors["weight"], model.weight.detach())
    # Odd layouts other writers make: a tensor whose bytes are not aligned to its item size
    # is copied, not viewed misaligned.
    raw = json.dumps(
        {
            "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
        }
    ).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytearray(struct.pack("<Q", len(raw)) + raw + bytes([1, 2, 3]))
    data += struct.pack("<2f", 1.5, -2.0)
    tensors, _ = checkpoint.map_safetensors(data)
    assert tensors["a"].tolist() == [1, 2, 3] and tensors["b"].tolist() == [1.5, -2.0]
    for bad, message in [
        (data[:-1], "cover .* bytes"),
        (data[:5], "shorter than a safetensors header"),
        (data.replace(b"[3,11]", b"[4,12]", 1).replace(b"[3, 11]", b"[4, 12]", 1), "starts at"),
    ]:
        with pytest.raises(ValueError, match=message):
            checkpoint.map_safetensors(bytearray(bad))


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]},  # crashed torch.empty
        {"dtype": "F32", "shape": [0, 2**62, 8], "data_offsets": [0, 0]},
        {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},  # taken as 1 by int()
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},  # unhashable: a TypeError
        {"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]},
        [1, 2],
    ],
)
def test_a_malformed_tensor_entry_is_a_checkpoint_error(tmp_path, entry):
    """What safetensors refuses is refused, as a CheckpointError naming the file, never a
    TypeError or RuntimeError from building the tensor, nor a reading of a bad entry."""
    raw = json.dumps({"t": entry}).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 if "[0, 4" in str(entry) else 0))
    with pytest.raises(CheckpointError, match="bad.safetensors is not a readable checkpoint"):
        checkpoint.load(path)


def test_a_header_in_another_encoding_or_odd_metadata_is_refused():
    utf16 = json.dumps({"__metadata__": {"a": "b"}}).encode("utf-16")
    utf16 += b" " * (-len(utf16) % 8)
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        checkpoint.map_safetensors(bytearray(struct.pack("<Q", len(utf16)) + utf16))
    odd = json.dumps({"__metadata__": []}).encode()
    odd += b" " * (-len(odd) % 8)
    with pytest.raises(ValueError, match="must map strings to strings"):
        checkpoint.map_safetensors(bytearray(struct.pack("<Q", len(odd)) + odd))


def test_a_path_object_named_like_a_shipped_model_stays_a_path(tmp_path, monkeypatch):
    """Path("ca2vdm-tiny") (a local file) resolves to that file, but it was then written as
    the text "ca2vdm-tiny", which is the shipped model: its generator served requests for the
    shipped model with the local file's weights."""
    import shutil
    from pathlib import Path

    from tests.models import save_test_generators
    from vidgen.generators import GenerationRequest, load_generator

    paths = save_test_generators(tmp_path / "made")
    monkeypatch.chdir(tmp_path)
    shutil.copy(paths["diffusion"], tmp_path / "ca2vdm-tiny")
    local = Path("ca2vdm-tiny")
    assert checkpoint.spelled(local) == "./ca2vdm-tiny"
    assert checkpoint.spelled("ca2vdm-tiny") == "ca2vdm-tiny"  # text: the shipped name
    assert checkpoint.spelled(Path("a/b.safetensors")) == "a/b.safetensors"
    assert not checkpoint.same_checkpoint(local, "ca2vdm-tiny")
    assert checkpoint.same_checkpoint(local, "./ca2vdm-tiny")
    assert GenerationRequest(model=local, frames=8).model == "./ca2vdm-tiny"
    gen = load_generator(local)
    assert gen.name == "./ca2vdm-tiny"
    with pytest.raises(ValueError, match="the request is for model 'ca2vdm-tiny'"):
        gen.open(GenerationRequest(model="ca2vdm-tiny", frames=gen.clip_len))
    gen.open(GenerationRequest(model=local, frames=gen.clip_len))  # its own file: served


@pytest.mark.parametrize(
    ("tensors", "error", "message"),
    [
        ({"a": torch.zeros(2, dtype=torch.complex128)}, TypeError, "dtype torch.complex128"),
        ({"__metadata__": torch.zeros(2)}, ValueError, "cannot be named '__metadata__'"),
    ],
)
def test_a_refused_save_names_its_file_and_makes_no_folders(tmp_path, tensors, error, message):
    """The temp file's folders were made before the tensors were checked: a refused save
    left runs/exp1/ behind, and its error did not name the file."""
    path = tmp_path / "runs" / "exp1" / "m.safetensors"
    with pytest.raises(error, match=rf"exp1/m\.safetensors: .*{message}"):
        checkpoint.save(path, tensors, TinyConfig())
    assert list(tmp_path.iterdir()) == []

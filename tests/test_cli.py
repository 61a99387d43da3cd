import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vidgen.cli import main
from vidgen.config import ConfigError, load_group
from vidgen.data import DataConfig
from vidgen.io import probe_video, read_video
from vidgen.worlds.agent import AgentWorldConfig
from vidgen.worlds.bouncing import BouncingShapes, BouncingShapesConfig


@pytest.fixture
def connects(monkeypatch) -> list:
    """The calls to workers.cluster.connect (each refused): a test that expects the CLI to
    fail before connecting checks it stays empty, whether or not a Ray instance already
    runs in this process (test_ray.py's, when it runs first)."""
    import workers.cluster

    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the CLI connected to Ray")

    monkeypatch.setattr(workers.cluster, "connect", refuse)
    return calls


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "vidgen.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "data preview" in out and "usage: vidgen" in out


def test_preview_bouncing_writes_a_video_decord_reads(tmp_path, capsys):
    out = tmp_path / "preview.mp4"
    code = main(
        ["data", "preview", "world=bouncing", "frames=24", f"out={out}", "lossless=true", "seed=4"]
    )
    assert code == 0
    assert "24 frames" in capsys.readouterr().out
    assert probe_video(out).num_frames == 24
    frames = read_video(out, backend="decord")
    assert frames.shape == (24, 64, 64, 3)
    expected = BouncingShapes(BouncingShapesConfig(), seed=4).trajectory(24).frames
    assert (frames.numpy() == expected).all()


def test_a_preview_over_a_render_removes_the_renders_sidecar(tmp_path):
    """The sidecar described the replaced video: `vidgen eval` scored the preview against
    that request's label."""
    out, sidecar = tmp_path / "v.mp4", tmp_path / "v.json"
    sidecar.write_text(json.dumps({"vidgen_version": "x", "request_sha256": "ab"}))
    assert main(["data", "preview", "world=bouncing", "frames=8", f"out={out}"]) == 0
    assert probe_video(out).num_frames == 8 and not sidecar.exists()
    notes = tmp_path / "w.json"  # a file vidgen did not write stays
    notes.write_text('{"mine": 1}')
    assert main(["data", "preview", "world=bouncing", "frames=8", f"out={tmp_path / 'w.mp4'}"]) == 0
    assert notes.read_text() == '{"mine": 1}'


def test_a_preview_beside_a_render_keeps_that_renders_sidecar(tmp_path):
    """x.json is the sidecar of the render x.mp4 (renders are .mp4): a preview to x.mkv, or
    to x.MP4 beside it, removed it while that render stood."""
    render, sidecar = tmp_path / "x.mp4", tmp_path / "x.json"
    assert main(["data", "preview", "world=bouncing", "frames=8", f"out={render}"]) == 0
    provenance = json.dumps({"vidgen_version": "x", "request_sha256": "ab"})
    sidecar.write_text(provenance)
    for name in ("x.mkv", "x.MP4"):
        assert (
            main(["data", "preview", "world=bouncing", "frames=8", f"out={tmp_path / name}"]) == 0
        )
        assert sidecar.read_text() == provenance, name


def test_preview_agent_with_overrides(tmp_path):
    out = tmp_path / "agent.mp4"
    assert main(["data", "preview", "world=agent", "world.size=48", "frames=16", f"out={out}"]) == 0
    assert read_video(out).shape == (16, 48, 48, 3)


def test_bad_overrides_are_reported(tmp_path, capsys, connects):
    assert main(["data", "preview", "frames=0", f"out={tmp_path / 'x.mp4'}"]) == 2
    assert "frames must be >= 1" in capsys.readouterr().err
    assert main(["data", "preview", "world=nowhere"]) == 2
    assert "agent bouncing" in capsys.readouterr().err
    assert main(["data", "preview", "world.colour=3"]) == 2
    assert "world.colour" in capsys.readouterr().err
    assert main(["render", "model=nowhere", f"out={tmp_path / 'x.mp4'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "d.mp4").mkdir()  # a folder where the video should go: refused at once
    for command in (["render"], ["data", "preview"]):
        assert main([*command, f"out={tmp_path / 'd.mp4'}"]) == 2
        assert "is a folder; give the video's file name" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()
    assert not connects  # failed before connecting


def test_an_out_that_links_nowhere_it_can_write_is_refused_before_ray(tmp_path, capsys, connects):
    """A symlink into a folder that does not exist passed every check: the render failed
    after Ray and its actors started, with a resume hint that could not help (a link loop
    failed at the join, after the whole video)."""
    (tmp_path / "latest.mp4").symlink_to(tmp_path / "renders" / "new" / "v.mp4")
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    for name, said in (("latest", "whose folder does not exist"), ("loop", "a symlink loop")):
        assert main(["render", "frames=16", f"out={tmp_path / name}.mp4"]) == 2
        assert said in capsys.readouterr().err
    (tmp_path / "renders" / "new").mkdir(parents=True)  # a link to a new file there is fine
    from vidgen.render_config import check_out

    assert check_out(tmp_path / "latest.mp4") == tmp_path / "latest.mp4"
    assert not connects


def test_an_out_whose_name_differs_from_another_video_only_in_suffix_case_is_refused(tmp_path):
    """v.mp4 and v.MP4 are two files on Linux with one sidecar, v.json: the second render
    wrote its provenance over the first's, and `vidgen eval` read it for both."""
    from vidgen.render_config import check_out, parts_folder

    (tmp_path / "v.MP4").write_bytes(b"a user's video")
    with pytest.raises(ValueError, match=r"v\.MP4.*share the provenance sidecar v\.json"):
        check_out(tmp_path / "v.mp4")
    parts_folder(tmp_path / "w.mP4").mkdir()  # a render of w.mP4 under way
    with pytest.raises(ValueError, match=r"\.w\.mP4\.parts"):
        check_out(tmp_path / "w.mp4")
    assert check_out(tmp_path / "x.mp4") == tmp_path / "x.mp4"
    # The same file under two spellings (a case-insensitive file system; a hard link here)
    (tmp_path / "y.mp4").write_bytes(b"a render")
    (tmp_path / "y.MP4").hardlink_to(tmp_path / "y.mp4")
    assert check_out(tmp_path / "y.mp4") == tmp_path / "y.mp4"
    assert check_out(tmp_path / "y.MP4") == tmp_path / "y.MP4"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model=kl-tiny",
            "is a KLConfig checkpoint, not a generator; shipped generators: "
            "['ca2vdm-tiny', 'nbp-tiny']",
        ),
        ("reencode=true", "reencode applies to token models only; ca2vdm-tiny is a diffusion"),
        ("model=nbp-tiny contrast=1.2", "contrast applies to diffusion models only; nbp-tiny"),
        # Taken and ignored: the same frames under another request hash.
        ("temperature=0.5", "temperature applies to token models only; ca2vdm-tiny"),
        ("top_k=3", "top_k applies to token models only; ca2vdm-tiny"),
        ("top_p=0.5", "top_p applies to token models only; ca2vdm-tiny"),
        ("model=nbp-tiny steps=4", "steps applies to diffusion models only; nbp-tiny"),
        # Past these Ray started and an actor failed, naming the model, not the key (or an
        # OverflowError traceback: max_restarts).
        ("max_streams=99999999999999999999", "max_streams must be <= 1024"),
        ("threads=99999999999999999999", "threads must be <= 1024"),
        ("max_restarts=99999999999999999999", "max_restarts must be <= 1000000"),
        ("contrast=0", "contrast must be > 0"),
        ("fps=0", "fps must be >= 1/1001"),
        ("steps=0", "steps must be >= 1"),
        ("seed=-1", "seed must be >= 0"),
        ("guidance=-1", "guidance must be >= 0"),
        ("top_p=0", "top_p must be in (0, 1]"),
        ("segment_clips=0", "segment_clips must be >= 1"),
        ("step_timeout=0", "step_timeout must be in (0, 604800"),
        # Ray's waits could not take these: an OverflowError traceback once actors ran
        ("step_timeout=inf", "step_timeout must be finite"),
        ("step_timeout=1e300", "step_timeout must be in (0, 604800"),
        (f"out={'a' * 260}.mp4", "File name too long"),  # an OSError traceback
    ],
)
def test_bad_render_keys_fail_before_ray_starts(tmp_path, capsys, connects, override, message):
    out = [] if override.startswith("out=") else [f"out={tmp_path / 'x.mp4'}"]
    assert main(["render", *override.split(), *out]) == 2
    assert message in capsys.readouterr().err
    assert not connects and not list(tmp_path.iterdir())


def test_a_render_refuses_a_context_it_would_write_over(tmp_path, capsys, connects):
    """context= the same file as out=: read in full, then replaced; the same command run
    again went on from its own output."""
    from vidgen.io import VideoWriter

    with VideoWriter(tmp_path / "v.mp4", lossless=True) as writer:
        writer.write(np.full((8, 64, 64, 3), 90, np.uint8))
    before = (tmp_path / "v.mp4").read_bytes()
    (tmp_path / "link.mp4").symlink_to("v.mp4")
    for out in ("v.mp4", "link.mp4"):
        assert main(["render", f"context={tmp_path / 'v.mp4'}", f"out={tmp_path / out}"]) == 2
        assert "is the file out=" in capsys.readouterr().err
    assert not connects and (tmp_path / "v.mp4").read_bytes() == before


def test_a_render_whose_sidecar_path_is_a_folder_fails_before_ray_starts(
    tmp_path, capsys, connects
):
    """It was found after the whole render, with the video published, a stray temporary file
    and the parts folder left, and an IsADirectoryError traceback."""
    (tmp_path / "x.json").mkdir()
    assert main(["render", "frames=16", f"out={tmp_path / 'x.mp4'}"]) == 2
    assert "its sidecar x.json is a folder" in capsys.readouterr().err
    assert not connects and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_render_keeps_a_users_file_where_its_sidecar_goes_and_names_unwritable_folders(
    tmp_path, capsys, connects, monkeypatch
):
    """A user's notes.json beside out=notes.mp4 was written over with provenance at the end;
    a folder that cannot be written failed after Ray and the actor started, exit 1, with a
    resume hint that could not help; a bad address was a Ray traceback."""
    import errno
    import json
    import tempfile

    import workers.cluster
    from vidgen import render_config

    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "precious notes"}')
    assert main(["render", "frames=16", f"out={tmp_path / 'notes.mp4'}"]) == 2
    assert "is a file vidgen did not write; move it" in capsys.readouterr().err
    assert notes.read_text() == '{"my": "precious notes"}' and not connects
    # A sidecar of an earlier render is vidgen's own: written over as before.
    notes.write_text(json.dumps({"vidgen_version": "0", "request_sha256": "ab", "seed": 1}))
    assert render_config.check_out(tmp_path / "notes.mp4") == tmp_path / "notes.mp4"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert main(["render", "frames=16", f"out={tmp_path / 'v.mp4'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be written: Read-only file system" in err and "resumes" not in err
    assert not connects
    monkeypatch.undo()

    def bad_address(address, *args, **kwargs):
        raise ValueError(f"Invalid address format: {address}")

    monkeypatch.setattr(workers.cluster, "connect", bad_address)
    assert main(["render", "frames=16", "address=bogus", f"out={tmp_path / 'v.mp4'}"]) == 2
    assert "address='bogus': Invalid address format: bogus" in capsys.readouterr().err


def test_a_render_of_an_out_being_rendered_fails_before_ray_starts(
    tmp_path, capsys, connects, monkeypatch
):
    """It was refused only once its own Ray instance and actor had started (28 s here); the
    lock it found is left as it was, and a symlink to the out being rendered is refused too."""
    from workers.render import _lock, check_not_rendering, lock_file

    out = tmp_path / "x.mp4"
    check_not_rendering(out)  # nothing there: no lock file made
    assert not lock_file(out).exists()
    fd = _lock(out)  # another render holds it
    try:
        assert main(["render", "frames=16", f"out={out}"]) == 2
        assert "is being rendered by another process right now" in capsys.readouterr().err
        (tmp_path / "link.mp4").symlink_to(out)
        assert main(["render", "frames=16", f"out={tmp_path / 'link.mp4'}"]) == 2
        assert "x.mp4' is being rendered" in capsys.readouterr().err
        assert not connects and lock_file(out).exists()
        monkeypatch.setenv("HOME", str(tmp_path))  # out=~/x.mp4 is the same out
        assert main(["render", "frames=16", "out='~/x.mp4'"]) == 2
        assert "is being rendered by another process" in capsys.readouterr().err
        assert not connects
    finally:
        os.close(fd)
    check_not_rendering(out)  # let go: nothing to refuse (the stale file is not a lock)


@pytest.mark.parametrize(
    "actions, message",
    [
        (np.zeros(10, dtype=np.int64), "actions must have one entry per frame (16), got 10"),
        ("npz", "must be a .npy array, got an .npz archive"),
        ("empty", "is not a readable .npy array"),  # np.load raised EOFError: a traceback
    ],
)
def test_bad_actions_fail_before_ray_starts(tmp_path, capsys, connects, actions, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if isinstance(actions, str) and actions == "npz":
        path = inputs / "a.npz"
        np.savez(path, actions=np.zeros(16, dtype=np.int64))
    elif isinstance(actions, str):  # "empty"
        path = inputs / "a.npy"
        path.write_bytes(b"")
    else:
        path = inputs / "a.npy"
        np.save(path, actions)
    out = tmp_path / "out"
    out.mkdir()
    args = ["render", "frames=16", f"actions={path}", f"out={out / 'x.mp4'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad actions" in err and message in err
    assert not connects and not list(out.iterdir())


def test_context_actions_from_files(tmp_path, capsys, connects):
    """``context_actions=`` a .npy of the context frames' actions: it needs context and
    actions, a bad one fails before Ray starts, and the request carries it end-aligned."""
    from vidgen.io import VideoWriter
    from vidgen.render_config import RenderConfig

    video = tmp_path / "c.mp4"
    with VideoWriter(video, lossless=True) as writer:
        writer.write(np.zeros((30, 32, 32, 3), dtype=np.uint8))
    acts, history, bad = tmp_path / "a.npy", tmp_path / "h.npy", tmp_path / "bad.npy"
    np.save(acts, np.zeros(16, dtype=np.int64))
    np.save(history, np.arange(30, dtype=np.int64) % 5)
    np.save(bad, np.zeros((30, 2)))
    out = str(tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="context_actions .* needs context and actions"):
        RenderConfig(context_actions=str(history), actions=str(acts), out=out)
    cfg = RenderConfig(
        frames=16, context=str(video), actions=str(acts), context_actions=str(history), out=out
    )
    req = cfg.request((32, 32, 3), clip_len=8)
    assert len(req.context) == 24 and req.context_actions.tolist() == list(np.arange(30) % 5)
    args = ["render", "frames=16", f"context={video}", f"actions={acts}", f"out={out}"]
    assert main([*args, f"context_actions={bad}"]) == 2
    err = capsys.readouterr().err
    assert "bad actions" in err and "context_actions must be one or more actions" in err
    assert not connects


def test_a_context_video_is_cut_to_its_last_whole_clips(tmp_path):
    from vidgen.io import VideoWriter
    from vidgen.render_config import load_context

    frames = np.zeros((30, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(30, dtype=np.uint8)[:, None, None] * 8
    path = tmp_path / "c.mp4"
    with VideoWriter(path, lossless=True) as writer:
        writer.write(frames)
    got = load_context(path, (16, 16, 3), clip_len=8)  # 30 frames: the last 24 kept
    assert got.shape == (24, 16, 16, 3)
    np.testing.assert_allclose(got[:, 8, 8, 0], frames[6:, 0, 0, 0], atol=2)
    assert load_context(path, None).shape == (30, 32, 32, 3)
    with pytest.raises(ValueError, match="32 frames"):
        load_context(path, None, clip_len=32)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="context=.*bad.mp4.*not a readable video"):
        load_context(tmp_path / "bad.mp4", None, clip_len=8)


def test_a_bare_word_after_a_command_is_named_not_taken_for_the_command(capsys):
    """`vidgen eval a.mp4` said "unknown command 'eval a.mp4'"; a leading Hydra `~key`
    deletion was taken for part of the command too."""
    assert main(["eval", "a.mp4"]) == 2
    err = capsys.readouterr().err
    assert "vidgen eval: 'a.mp4' is not a key=value override (did you mean videos=a.mp4?" in err
    assert main(["data", "preview", "p.mp4"]) == 2
    assert "did you mean out=p.mp4?" in capsys.readouterr().err
    # train has no path key: a preset's name is named with its group (it said "key=kl-tiny")
    assert main(["train", "kl-tiny"]) == 2
    assert "did you mean tokenizer=kl-tiny?" in capsys.readouterr().err
    assert main(["train", "nbp-tiny"]) == 2
    assert "did you mean model=nbp-tiny?" in capsys.readouterr().err
    assert main(["eval", "videos=run(1).mp4"]) == 2  # Hydra's grammar: the fix is quoting
    assert "quote a value holding ( ) [ ]" in capsys.readouterr().err
    assert main(["eval", "videos='run(1).mp4'"]) == 2
    assert "videos='run(1).mp4': no such file" in capsys.readouterr().err
    # The hint names the command's own key (render has no videos), and a bare word after an
    # override is named as one, not taken for a quoting problem.
    assert main(["render", "out=run(1).mp4"]) == 2
    assert "\"out='run(1).mp4'\"" in capsys.readouterr().err
    assert main(["eval", "label=3", "a.mp4"]) == 2
    assert "'a.mp4' is not a key=value override: did you mean videos=a.mp4?" in (
        capsys.readouterr().err
    )
    # A config group set to null, or an override with no key: Hydra's plain errors.
    assert main(["data", "preview", "world=null"]) == 2
    assert "bad config: Config group override must be a string" in capsys.readouterr().err
    assert main(["render", "+="]) == 2
    assert "bad config: Hydra could not read them" in capsys.readouterr().err
    assert main(["evil"]) == 2
    assert "unknown command 'evil'; commands: render" in capsys.readouterr().err
    assert main(["eval", "~out", "videos=v.mp4"]) == 2  # an override, read by Hydra
    err = capsys.readouterr().err
    assert "vidgen eval: bad config" in err and "unknown command" not in err


def test_preview_and_eval_failures_are_messages_not_tracebacks(tmp_path, capsys, monkeypatch):
    """A full disk or Ctrl-C in `data preview` (and Ctrl-C in `eval`) ended in a traceback;
    an eval report that could not be written did not name `out`."""
    import errno

    import vidgen.data.preview
    import vidgen.eval.report

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device")

    def interrupted(*args):
        raise KeyboardInterrupt

    out = tmp_path / "p.mp4"
    monkeypatch.setattr(vidgen.data.preview, "preview", full)
    assert main(["data", "preview", "frames=8", f"out={out}"]) == 2
    assert "vidgen data preview: [Errno 28] No space left" in capsys.readouterr().err
    monkeypatch.setattr(vidgen.data.preview, "preview", interrupted)
    assert main(["data", "preview", "frames=8", f"out={out}"]) == 130
    assert "interrupted" in capsys.readouterr().err
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    monkeypatch.setattr(vidgen.eval.report, "evaluate", lambda cfg: {})
    monkeypatch.setattr(vidgen.eval.report, "write_report", lambda report, path: full(None))
    assert main(["eval", f"videos={video}", f"out={tmp_path / 's.json'}"]) == 2
    assert "s.json' cannot be written: [Errno 28]" in capsys.readouterr().err
    monkeypatch.setattr(vidgen.eval.report, "evaluate", interrupted)
    assert main(["eval", f"videos={video}"]) == 130
    assert "vidgen eval: interrupted" in capsys.readouterr().err


def test_sigterm_takes_the_interrupt_path_and_leaves_no_temp_file(tmp_path):
    """`kill` of a `data preview` left its half-written temp file behind for good."""
    import signal
    import time

    out = tmp_path / "p.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidgen.cli", "data", "preview", "frames=100000", f"out={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".*.tmp.mp4")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until it is writing
    assert any(tmp_path.glob(".*.tmp.mp4")), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", ["read", "disk"])
def test_a_training_run_stopped_by_a_read_or_disk_error_says_so_in_one_line(
    error, monkeypatch, capsys
):
    """A video that fails to decode midway (or a full disk) gave a raw traceback."""
    import vidgen.train
    from vidgen.io import VideoReadError

    def fails(cfg):
        if error == "read":
            raise VideoReadError("a.mp4: could not decode frames")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vidgen.train, "run_train", fails)
    assert main(["train", "tokenizer=kl-test"]) == 1
    err = capsys.readouterr().err
    assert "vidgen train: stopped:" in err and "The same command resumes" in err
    assert "Traceback" not in err


def test_sigterm_while_the_config_is_read_takes_the_interrupt_path(monkeypatch, capsys):
    """The handler was set only once the config was composed: a stop in the seconds of
    imports and composing killed the process (exit -15) where the others exit 130."""
    import os
    import signal
    import threading
    import time

    import vidgen.config

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set in the main thread only")

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the signal arrives here
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(vidgen.config, "load_config_and_choices", stopped)
    assert main(["train", "model=ca2vdm-test"]) == 130
    assert "vidgen train: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # given back


def test_command_help_shows_config(capsys):
    assert main(["data", "preview", "world=agent", "--help"]) == 0
    out = capsys.readouterr().out
    assert "continuous: false" in out and "frames: 256" in out


def test_command_help_checks_the_values_it_shows(capsys):
    """--help printed a config a run refuses at once (exit 0, no word): the values are
    checked once every required key is given."""
    assert main(["render", "frames=-5", "--help"]) == 2
    out, err = capsys.readouterr()
    assert "frames: -5" in out  # shown all the same
    assert "vidgen render: bad config (a run would refuse it): frames must be >= 1" in err
    assert main(["train", "model=ca2vdm-test", "model.context_noise_max=-3", "--help"]) == 2
    assert "context_noise_max must be 0 (off)" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0  # videos still to give (???): nothing to refuse
    assert capsys.readouterr().err == ""
    assert main(["render", "frames=64", "--help"]) == 0


@pytest.mark.parametrize("name", ["bouncing", "agent", "mix"])
def test_data_group_composes_to_data_config(name):
    data = load_group("data", name, ["data.batch_size=2", "data.agent.step=3"])
    assert isinstance(data, DataConfig) and data.name == name and data.batch_size == 2
    assert isinstance(data.agent, AgentWorldConfig) and data.agent.step == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.clip_len=0"], "bad config: data.clip_len must be >= 1, got 0"),
        (["data.stride=0"], "bad config: data.stride must be >= 1"),
        (["data.size=0"], "bad config: data.size must be >= 1"),
        (["train.device=bogus"], "bad config: train.device must be auto, cpu, cuda or cuda:N"),
        pytest.param(
            ["train.device=cuda"],
            "cannot start: train.device='cuda' but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine"),
        ),
        # A nested world config's own check names its leaf field: the key it is under too.
        (["data.bouncing.max_shapes=9"], "bad config: data.bouncing: need 1 <= min_shapes"),
        (["data=agent", "data.agent.step=0"], "bad config: data.agent: step must be"),
        (["data=folder", "data.root=EMPTY"], "no video files"),
        (["data=folder", "data.root=MISSING"], "cannot start: data.root="),
        # Taken and ignored before: a world's own size (data.size wins) and hydra settings.
        (["data.bouncing.size=32"], "data.bouncing.size=32 is not read"),
        (["hydra.run.dir=EMPTY"], "'hydra.run.dir="),
        (["+hydra.foo=1"], "'+hydra.foo=1': hydra settings are not read"),
        (["++hydra.job.chdir=true"], "hydra settings are not read"),
        # Exported as out/<name>.safetensors: ../x wrote outside out.
        (["name=../escape"], "name must be a file name"),
        (["name=a/b"], "name must be a file name"),
    ],
)
def test_a_train_that_cannot_start_says_why_without_a_traceback(
    tmp_path, capsys, overrides, message
):
    (tmp_path / "empty").mkdir()
    overrides = [
        o.replace("EMPTY", str(tmp_path / "empty")).replace("MISSING", str(tmp_path / "no"))
        for o in overrides
    ]
    out = tmp_path / "runs" / "run"  # its parent folder is made for it too
    args = ["train", "tokenizer=kl-tiny", *overrides, "train.steps=1", f"out={out}"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.parent.exists()


@pytest.mark.parametrize("interrupt", [True, False])
def test_an_interrupted_or_diverged_train_says_how_to_go_on_in_one_line(
    tmp_path, capsys, monkeypatch, interrupt
):
    import vidgen.train
    from vidgen.train import TrainingDiverged

    def stopped(cfg):
        raise KeyboardInterrupt if interrupt else TrainingDiverged("the loss at step 3 is nan")

    monkeypatch.setattr(vidgen.train, "run_train", stopped)
    args = ["train", "tokenizer=kl-tiny", "train.steps=1", f"out={tmp_path / 'run'}"]
    assert main(args) == (130 if interrupt else 1)
    err = capsys.readouterr().err
    assert ("interrupted. The same command resumes" if interrupt else "diverged: the loss") in err
    assert "Traceback" not in err


def test_a_nested_group_option_names_its_key():
    with pytest.raises(ConfigError, match=r"^data\.bouncing: need 1 <= min_shapes"):
        load_group("data", "mix", ["data.bouncing.max_shapes=9"])
    # A node that cannot even be read is named too (not an OmegaConf error escaping).
    with pytest.raises(ConfigError, match=r"data\.bouncing.*missing mandatory value"):
        load_group("data", "mix", ["data.bouncing=???"])
    with pytest.raises(ConfigError, match="nope"):
        load_group("data", "mix", ["data.bouncing=${nope}"])


def test_folder_data_needs_root(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        load_group("data", "folder")
    data = load_group("data", "folder", [f"data.root={tmp_path}"])
    assert data.root == str(tmp_path) and data.stride is None


def test_render_model_key_is_a_plain_value_even_after_train_composes():
    from vidgen.config import load_config

    train = load_config("train", ["model=nbp-test"])
    assert train.model is not None
    render = load_config("render", ["model=ca2vdm-tiny", "frames=16"])
    assert render.model == "ca2vdm-tiny" and render.frames == 16
    assert load_config("train", ["tokenizer=kl-test"]).tokenizer is not None


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("render", ["model=nbp-tiny", "frames=16"]),
        ("train", ["model=ca2vdm-test", "data=bouncing", "train.steps=3"]),
        ("train", ["tokenizer=larp-test", "data=folder", "data.root=videos"]),
        ("eval", ["videos=a.mp4"]),
    ],
)
def test_the_cli_reads_config_and_group_choices_from_one_composition(name, overrides):
    """The CLI composes once (``load_config_and_choices``), not twice; it must read what
    ``load_config`` and ``group_choices`` read apart, and refuse what they refuse."""
    from vidgen.config import ConfigError, group_choices, load_config, load_config_and_choices

    cfg, choices = load_config_and_choices(name, overrides)
    assert cfg == load_config(name, overrides)
    assert choices == group_choices(name, overrides)
    assert "hydra" not in choices
    with pytest.raises(ConfigError, match="framez"):
        load_config_and_choices(name, [*overrides, "+framez=3"])


def test_configs_are_found_beside_an_uninstalled_source_checkout(monkeypatch):
    """With PYTHONPATH=<checkout> and no install there is no vidgen.configs package; the
    configs/ folder beside the package is used instead, composing the same config."""
    from vidgen import config as config_module

    installed = config_module.load_config("train", ["model=ca2vdm-tiny", "train.steps=7"])
    # An entry of None makes the import fail (and find_spec answer None), as it does there.
    monkeypatch.setitem(sys.modules, config_module.CONFIG_MODULE, None)
    with pytest.raises(ImportError):
        import vidgen.configs  # noqa: F401
    source = config_module.load_config("train", ["model=ca2vdm-tiny", "train.steps=7"])
    assert source == installed and source.train.steps == 7
    assert config_module.group_choices("train", ["model=ca2vdm-tiny"])["model"] == "ca2vdm-tiny"


@pytest.mark.parametrize("remote", [False, True])
@pytest.mark.parametrize("bad", ["frames=9", "label=9"])  # test clips: 2 frames
def test_a_request_the_model_refuses_exits_2_without_a_traceback(
    tmp_path, capsys, monkeypatch, bad, remote
):
    """Frames that are not whole clips, or a label out of the model's range, are known only
    once the model is loaded (in its actors): a clean message, exit 2, nothing written."""
    import workers.cluster
    import workers.executors
    from tests.models import save_test_generators
    from workers.actor import GeneratorWorker
    from workers.executors import LocalExecutor

    models = save_test_generators(tmp_path / "models")
    monkeypatch.setattr(workers.cluster, "connect", lambda address: False)  # no Ray here

    class AsFromAnActor(LocalExecutor):
        """An actor's refusal as Ray hands it over: a RayTaskError that is also the
        ValueError, its text the remote traceback."""

        def open(self, key, request, timeout=None):
            from ray.exceptions import RayTaskError

            try:
                super().open(key, request)
            except ValueError as err:
                trace = f"Traceback (most recent call last):\n  File actor.py\nValueError: {err}"
                raise RayTaskError(
                    "GeneratorWorker.open", trace, err
                ).as_instanceof_cause() from None

    kind = AsFromAnActor if remote else LocalExecutor
    monkeypatch.setattr(
        workers.executors,
        "RayExecutor",
        lambda model, *args, **kwargs: kind(GeneratorWorker(model, max_streams=2)),
    )
    out = tmp_path / "out"
    out.mkdir()
    args = ["render", f"model={models['diffusion']}", "steps=1", bad, f"out={out / 'x.mp4'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad request" in err and bad.split("=")[0] in err
    assert "Traceback" not in err and "File " not in err and "pid=" not in err
    assert not list(out.iterdir())


def test_ray_placement_and_connection_failures_exit_2_naming_the_key(tmp_path, capsys, monkeypatch):
    """No cluster at `address=auto`, more actors than a local instance holds, an actor that
    cannot be placed: each was a traceback (the local case after a 120 s wait)."""
    import ray

    import workers.cluster
    import workers.executors
    from tests.models import save_test_generators
    from workers.actor import SchedulingError

    model = save_test_generators(tmp_path / "models")["diffusion"]
    out = f"out={tmp_path / 'x.mp4'}"

    def no_cluster(address):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(workers.cluster, "connect", no_cluster)
    assert main(["render", f"model={model}", "address=auto", out]) == 2
    assert "address='auto': Could not find any running Ray instance" in capsys.readouterr().err

    monkeypatch.setattr(workers.cluster, "connect", lambda address: True)  # "started" one
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert main(["render", f"model={model}", "actors=3", "address=", out]) == 2
    assert "actors=3: this machine's local Ray instance places at most 2" in (
        capsys.readouterr().err
    )

    retired = []

    class Unplaceable:
        made = 0

        def __init__(self, *args, **kwargs):
            Unplaceable.made += 1
            if Unplaceable.made == 2:
                raise SchedulingError("a GeneratorActor asking for {'num_gpus': 1} ...")

        def retire(self):
            retired.append(self)

    monkeypatch.setattr(workers.executors, "RayExecutor", Unplaceable)
    assert main(["render", f"model={model}", "actors=2", "address=auto", out]) == 2
    err = capsys.readouterr().err
    assert "actors=2: a GeneratorActor asking for" in err and "Traceback" not in err
    assert len(retired) == 1  # the one that did start does not keep its GPU


def serve_locally(tmp_path, monkeypatch) -> str:
    """A test diffusion model served by in-process executors (no Ray): its path."""
    import workers.cluster
    import workers.executors
    from tests.models import save_test_generators
    from workers.actor import GeneratorWorker
    from workers.executors import LocalExecutor

    model = save_test_generators(tmp_path / "models")["diffusion"]
    monkeypatch.setattr(workers.cluster, "connect", lambda address: False)
    monkeypatch.setattr(
        workers.executors,
        "RayExecutor",
        lambda model, *args, **kwargs: LocalExecutor(GeneratorWorker(model, max_streams=2)),
    )
    return model


def test_a_render_that_cannot_go_on_exits_1_and_says_it_resumes(tmp_path, capsys, monkeypatch):
    import workers.render
    from workers.orchestrator import NoProgress

    model = serve_locally(tmp_path, monkeypatch)

    def fails(*args, **kwargs):
        raise NoProgress("stream 0 went through 4 executor failures in a row")

    monkeypatch.setattr(workers.render, "render", fails)
    assert main(["render", f"model={model}", f"out={tmp_path / 'x.mp4'}"]) == 1
    err = capsys.readouterr().err
    assert "stopped: stream 0 went through 4" in err and "resumes" in err
    assert "Traceback" not in err


def test_a_render_whose_writes_fail_exits_1_and_says_it_resumes(tmp_path, capsys, monkeypatch):
    import workers.render

    model = serve_locally(tmp_path, monkeypatch)

    def full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(workers.render, "save_snapshot", full)
    out = tmp_path / "x.mp4"
    assert main(["render", f"model={model}", "frames=8", "steps=1", f"out={out}"]) == 1
    err = capsys.readouterr().err
    assert "stopped: writing the video failed: OSError: No space left on device" in err
    assert "resumes" in err and "Traceback" not in err and not out.exists()


def test_the_provenance_names_the_context_video(tmp_path, monkeypatch):
    """The request's JSON leaves the context frames out: the sidecar names the video."""
    import json

    from vidgen.io import VideoWriter

    model = serve_locally(tmp_path, monkeypatch)
    start = tmp_path / "start.mp4"
    with VideoWriter(start, lossless=True) as writer:
        writer.write(np.full((4, 32, 32, 3), 100, np.uint8))
    out = tmp_path / "x.mp4"
    args = ["render", f"model={model}", "frames=4", "steps=1", f"context={start}", f"out={out}"]
    assert main(args) == 0
    assert json.loads(out.with_suffix(".json").read_text())["context"] == str(start)


@pytest.mark.parametrize(
    ("command", "overrides", "key"),
    [
        ("render", ["+framez=32"], "framez"),
        ("train", ["tokenizer=kl-test", "+train.stepz=5"], "train.stepz"),
        ("train", ["tokenizer=kl-test", "+tokenizer.foo=1"], "tokenizer.foo"),
    ],
)
def test_a_key_added_with_plus_that_no_config_has_is_refused(command, overrides, key):
    """Hydra's own error for a typo says "use +framez=32"; doing so rendered the default 256
    frames, the key dropped without a word."""
    from vidgen.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"unknown key\(s\) {re.escape(key)}"):
        load_config(command, overrides)


def test_a_generator_whose_tokenizer_is_missing_fails_before_ray_starts(tmp_path, capsys, connects):
    """Only the generator's header was checked: its missing tokenizer failed inside the
    actor, a 50-line ActorDiedError traceback."""
    from tests.models import save_test_generators
    from vidgen import checkpoint

    models = save_test_generators(tmp_path / "models")
    tokenizer = checkpoint.load(models["diffusion"]).card["tokenizer"]
    Path(tokenizer).unlink()
    assert main(["render", f"model={models['diffusion']}", f"out={tmp_path / 'x.mp4'}"]) == 2
    err = capsys.readouterr().err
    assert "the tokenizer it names" in err and "does not exist" in err
    assert "Traceback" not in err and not connects


def test_a_damaged_parts_folder_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    from workers.render import parts_folder

    model = serve_locally(tmp_path, monkeypatch)
    out = tmp_path / "x.mp4"
    parts_folder(out).mkdir()
    (parts_folder(out) / "truth.safetensors").write_bytes(b"not a checkpoint")
    assert main(["render", f"model={model}", "frames=8", "steps=1", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and "truth.safetensors" in err and "Traceback" not in err


def test_out_and_fps_are_checked_as_the_render_checks_them(tmp_path, capsys, connects):
    """out='.mp4' passed the config and failed after Ray started; 'x.MP4' was refused by the
    config and taken by the render; fps=12.5 was refused though a request takes it."""
    from vidgen.render_config import RenderConfig

    assert main(["render", f"out={tmp_path / '.mp4'}"]) == 2
    assert "out must end in .mp4" in capsys.readouterr().err and not connects
    assert RenderConfig(out=str(tmp_path / "x.MP4")).out.endswith(".MP4")
    assert RenderConfig(fps=12.5, out=str(tmp_path / "x.mp4")).fps == 12.5


def test_commands_with_and_without_model_presets_compose_in_any_order():
    """The schemas are stored once per process and again only when a command without model
    preset groups (render: ``model`` is a plain key) follows one with them (train), or the
    other way round."""
    from vidgen.config import load_config

    for _ in range(2):
        assert load_config("train", ["model=nbp-test"]).model.dim == 32
        assert load_config("render", ["model=nbp-test"]).model == "nbp-test"

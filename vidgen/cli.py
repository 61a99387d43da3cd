"""The ``vidgen`` command: a plain dispatcher over Hydra-composed commands.

    vidgen <command> [<subcommand>] key=value ...

Each command names a top-level YAML in ``configs/`` and a function taking its typed config;
``key=value`` arguments are Hydra overrides (``world=agent``, ``world.size=96``, ``+data=mix``
for an optional group); a key no config has is an error, ``+`` or not.
``vidgen --help`` lists the commands; ``vidgen <command> --help`` shows a command's config.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PROG = "vidgen"


@dataclass(frozen=True)
class Command:
    """``run`` is ``"module:function"``, imported only when the command runs so that
    ``vidgen --help`` stays fast."""

    config_name: str
    run: str
    help: str
    example: str


COMMANDS: dict[tuple[str, ...], Command] = {
    ("render",): Command(
        config_name="render",
        run="vidgen.cli:run_render",
        help="render a video of any length with Ray actors (resumable; out + a .json sidecar)",
        example="vidgen render model=ca2vdm-tiny frames=1024 label=3 seed=0 out=video.mp4",
    ),
    ("train",): Command(
        config_name="train",
        run="vidgen.cli:run_train",
        help="train a tokenizer or a generator (resumable; exports <out>/<name>.safetensors)",
        example="vidgen train tokenizer=kl-tiny data=mix train.steps=6000",
    ),
    ("eval",): Command(
        config_name="eval",
        run="vidgen.cli:run_eval",
        help="score videos against the procedural worlds (counts, motion, seams) and FVD",
        example="vidgen eval videos=video.mp4 fvd_reference=real/ out=scores.json",
    ),
    ("data", "preview"): Command(
        config_name="preview",
        run="vidgen.cli:run_preview",
        help="render a procedural world (bouncing shapes or the agent room) to an mp4",
        example="vidgen data preview world=bouncing frames=256 out=preview.mp4",
    ),
}


def run_render(cfg: Any, choices: dict[str, str]) -> int:
    # The one place vidgen reaches into the Ray layer: the command at the top of the stack.
    from vidgen.checkpoint import CheckpointError
    from vidgen.generators import check_generator_for

    if not cfg.address.startswith("ray://"):
        # The actors run on this machine's cluster: a bad model name (or a checkpoint that is
        # not a generator, reencode for a diffusion model, contrast for a token one) fails
        # here, before any actor starts, naming the shipped ones.
        try:
            check_generator_for(cfg)
        except (CheckpointError, ValueError) as err:
            print(f"{PROG} render: bad model: {err}", file=sys.stderr)
            return 2
    if cfg.actions:  # checked against `frames` (and each other) before any actor starts
        try:
            cfg.request_without_files(**cfg.action_files())
        except ValueError as err:
            print(f"{PROG} render: bad actions: {err}", file=sys.stderr)
            return 2
    from vidgen.render_config import check_writable
    from workers.render import check_not_rendering

    try:  # before Ray and the actors start (seconds): the render itself takes the lock
        check_not_rendering(cfg.out)
        check_writable(cfg.out)
    except ValueError as err:
        print(f"{PROG} render: {err}", file=sys.stderr)
        return 2
    import ray

    from workers.actor import actor_resources
    from workers.cluster import connect

    try:
        started = connect(cfg.address)
    except (ConnectionError, ValueError) as err:  # ValueError: Ray's "Invalid address format"
        print(f"{PROG} render: address={cfg.address!r}: {err}", file=sys.stderr)
        return 2
    try:
        if started and cfg.address == "":  # a local instance cannot grow: check it holds them
            resources = ray.cluster_resources()
            need = actor_resources(resources)
            kind, per = ("GPU", "num_gpus") if need["num_gpus"] else ("CPU", "num_cpus")
            room = int(resources.get(kind, 0) // need[per])
            if cfg.actors > room:
                print(
                    f"{PROG} render: actors={cfg.actors}: this machine's local Ray instance "
                    f"places at most {room} (one {kind} each; it has {resources.get(kind, 0):g})",
                    file=sys.stderr,
                )
                return 2
        return _render(cfg)
    finally:
        if started:
            ray.shutdown()


def _render(cfg: Any) -> int:
    from vidgen.checkpoint import CheckpointError
    from vidgen.io import VideoReadError
    from workers.actor import ActorLoadError, SchedulingError
    from workers.executors import RayExecutor
    from workers.orchestrator import NoExecutorsLeft, Orchestrator, SinkError
    from workers.render import IncompleteRender, render

    executors: list[RayExecutor] = []
    try:
        for _ in range(cfg.actors):
            executors.append(
                RayExecutor(
                    cfg.model, cfg.max_streams, cfg.threads, cfg.max_restarts, dtype=cfg.dtype
                )
            )
    except (SchedulingError, ActorLoadError) as err:
        for executor in executors:  # free what did start (a running cluster keeps going)
            executor.retire()
        print(f"{PROG} render: actors={cfg.actors}: {err}", file=sys.stderr)
        return 2
    info = executors[0].info
    try:
        request = cfg.request(tuple(info["frame_shape"]), info["clip_len"])
    except (ValueError, VideoReadError) as err:  # a context video unreadable or too short
        print(f"{PROG} render: bad input: {err}", file=sys.stderr)
        return 2
    try:
        orch = Orchestrator(
            executors,
            snapshot_every=cfg.snapshot_every,
            step_timeout=cfg.step_timeout,
            replace=lambda failed: failed.replacement(),
        )
    except ValueError as err:  # actors that would make different frames (a file changed
        for executor in executors:  # while they loaded): free them, say why
            executor.retire()
        print(f"{PROG} render: actors={cfg.actors}: {err}", file=sys.stderr)
        return 2
    try:
        # The request's JSON holds no frames: the provenance names the video continued.
        extra = {"context": str(cfg.context)} if cfg.context else None
        result = render(
            orch, request, cfg.out, cfg.segment_clips, cfg.lossless, extra_provenance=extra
        )
    except (CheckpointError, VideoReadError) as err:  # a damaged parts folder (its file named)
        print(f"{PROG} render: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # refused by the model (frames not whole clips, label range)
        # An actor's refusal arrives as Ray's error wrapping the ValueError, with the remote
        # traceback in its text: print the refusal itself.
        reason = getattr(err, "cause", None) or err
        print(f"{PROG} render: bad request: {reason}", file=sys.stderr)  # or a resume refused
        return 2
    except TimeoutError:  # an OSError too (Ray's GetTimeoutError): no write failure
        raise
    except (SinkError, IncompleteRender, OSError) as err:  # a write failed (a full disk)
        reason = err.cause if isinstance(err, SinkError) else err
        print(
            f"{PROG} render: stopped: writing the video failed: {type(reason).__name__}: "
            f"{reason}. The finished segments stay: the same command resumes from them.",
            file=sys.stderr,
        )
        return 1
    except NoExecutorsLeft as err:  # actors lost for good, or a step that always fails
        print(
            f"{PROG} render: stopped: {err}. The finished segments stay: the same command "
            "resumes from them.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:  # render() has kept the parts and freed the lock
        print(
            f"\n{PROG} render: interrupted. The finished segments stay: the same command "
            "resumes from them.",
            file=sys.stderr,
        )
        return 130
    where = ", ".join(f"{e.info['device']}{e.info['gpu_ids'] or ''}" for e in executors)
    resumed = f" (resumed after {result.resumed_frames})" if result.resumed_frames else ""
    print(
        f"wrote {result.path}: {result.frames} frames{resumed} in {result.seconds:.1f}s, "
        f"{result.frames_per_second:.1f} frames/s on {len(executors)} actor(s) [{where}]"
    )
    return 0


_RESUMES = (
    "The same command resumes from the last state saved (every train.ckpt_every steps), if any."
)


def run_train(cfg: Any, choices: dict[str, str]) -> int:
    from vidgen.io import VideoReadError
    from vidgen.train import TrainingDiverged, TrainSetupError
    from vidgen.train import run_train as train

    if not cfg.name:
        cfg.name = choices.get("tokenizer") or choices.get("model") or "model"
    try:
        path = train(cfg)
    except TrainSetupError as err:
        print(f"{PROG} train: cannot start: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"{PROG} train: diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\n{PROG} train: interrupted. {_RESUMES}",
            file=sys.stderr,
        )
        return 130
    except (VideoReadError, OSError) as err:  # a video that fails to decode midway, a full disk
        print(f"{PROG} train: stopped: {err}\n{_RESUMES}", file=sys.stderr)
        return 1
    from vidgen.train.loop import STATE_FILE

    if path.name == STATE_FILE:  # train.stop_at: nothing exported yet
        print(f"stopped at train.stop_at; state saved to {path}: run again to resume")
    else:
        print(f"exported {path}")
    return 0


def run_eval(cfg: Any, choices: dict[str, str]) -> int:
    from vidgen.eval.fvd import FVDError
    from vidgen.eval.report import evaluate, report_json, write_report
    from vidgen.io import VideoReadError

    try:
        report = evaluate(cfg)
        if cfg.out:
            try:
                print(f"wrote {write_report(report, cfg.out)}", file=sys.stderr)
            except OSError as err:
                raise OSError(f"out={cfg.out!r} cannot be written: {err}") from err
    except (ValueError, VideoReadError, FVDError, OSError) as err:
        print(f"{PROG} eval: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG} eval: interrupted; nothing written", file=sys.stderr)
        return 130
    print(report_json(report))
    return 0


def run_preview(cfg: Any, choices: dict[str, str]) -> int:
    from vidgen.data.preview import preview

    try:
        result = preview(cfg)
    except (ValueError, OSError) as err:  # a full disk, an out in a missing folder
        print(f"{PROG} data preview: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the writer removed its temp file
        print(f"\n{PROG} data preview: interrupted; {cfg.out} not written", file=sys.stderr)
        return 130
    label = f", label {result.label}" if result.label is not None else ""
    print(
        f"wrote {result.path} ({result.frames} frames{label}) in {result.seconds:.2f}s: "
        f"{result.frames_per_second:.0f} frames/s"
    )
    return 0


def usage() -> str:
    width = max(len(" ".join(words)) for words in COMMANDS)
    lines = [
        f"usage: {PROG} <command> key=value ...",
        "",
        "commands:",
        *(f"  {' '.join(w):<{width}}  {c.help}" for w, c in COMMANDS.items()),
        "",
        f"'{PROG} <command> --help' shows the command's config and its keys; 'key=value'",
        "arguments are Hydra overrides (group=option, a.b=value; a key no config has, even",
        "with +, is an error).",
        "",
        "examples:",
        *(f"  {c.example}" for c in COMMANDS.values()),
    ]
    return "\n".join(lines)


# The key a bare path given to a command most likely meant.
_PATH_KEYS = {"eval": "videos", "render": "out", "data preview": "out"}


def _split(argv: Sequence[str]) -> tuple[tuple[str, ...], list[str], list[str]]:
    """(command words, overrides, flags)."""
    words: list[str] = []
    rest = list(argv)
    while rest and "=" not in rest[0] and not rest[0].startswith(("-", "~", "+")):
        words.append(rest.pop(0))
    flags = [a for a in rest if a.startswith("-")]
    overrides = [a for a in rest if not a.startswith("-")]
    return tuple(words), overrides, flags


def _resolve(run: str) -> Callable[[Any, dict[str, str]], int]:
    module, _, name = run.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    # SIGTERM (`kill`, a scheduler's stop) takes the Ctrl-C path, which every command handles
    # (temp files removed, a training state or a render's segments kept): by default it
    # killed the process where it stood, leaving a half-written temp file behind. Set before
    # the config is read: a stop in the seconds of imports and composing exited -15.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a command's own handling (render: while Ray starts)
        print(f"\n{' '.join([PROG, *_split(argv)[0]])}: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    words, overrides, flags = _split(argv)
    if not words:
        asked = not argv or bool(set(flags) & {"-h", "--help"})
        print(usage(), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    command = COMMANDS.get(words)
    if command is None:
        # A known command followed by a bare word (`vidgen eval a.mp4`): that word is the
        # mistake, not the command.
        found = next((n for n in range(len(words) - 1, 0, -1) if words[:n] in COMMANDS), 0)
        if found:
            name, stray = " ".join(words[:found]), words[found]
            key = _PATH_KEYS.get(name, "key")
            if name == "train":  # a preset's name: the group it is one of
                key = "tokenizer" if stray.startswith(("kl-", "larp-")) else "model"
            print(
                f"{PROG} {name}: {stray!r} is not a key=value override (did you mean "
                f"{key}={stray}? '{PROG} {name} --help' shows the keys)",
                file=sys.stderr,
            )
            return 2
        known = ", ".join(" ".join(w) for w in COMMANDS)
        print(f"{PROG}: unknown command {' '.join(words)!r}; commands: {known}", file=sys.stderr)
        return 2
    unknown = [f for f in flags if f not in ("-h", "--help")]
    if unknown:
        print(f"{PROG}: unknown option {unknown[0]!r}; use key=value overrides", file=sys.stderr)
        return 2

    from omegaconf import OmegaConf

    from vidgen.config import ConfigError, compose_config, load_config_and_choices

    try:
        if flags:
            cfg = compose_config(command.config_name, overrides)
            print(f"{' '.join(words)}: {command.help}\n\nexample: {command.example}\n")
            print("config (override any key with key=value):")
            print(OmegaConf.to_yaml(cfg), end="")
            # The values are checked too (a run would refuse them at once), once the keys
            # still to fill in (???, such as eval's videos) are given.
            if OmegaConf.missing_keys(cfg):
                return 0
            return 0 if _valid(words, command.config_name, overrides) else 2
        cfg, choices = load_config_and_choices(command.config_name, overrides)
    except ConfigError as err:
        hint = ""
        if "override_grammar" in str(err):  # Hydra's parser: ( ) [ ] { } , = ~ in a value
            key = _PATH_KEYS.get(" ".join(words), "out")
            bare = [o for o in overrides if "=" not in o and not o.startswith(("~", "+"))]
            hint = (
                f"\n(quote a value holding ( ) [ ] {{ }} , ~ spaces or letters beyond ASCII, "
                f"shell quotes around Hydra's: {PROG} {' '.join(words)} \"{key}='run(1).mp4'\")"
                if not bare
                else f"\n({bare[0]!r} is not a key=value override: did you mean {key}={bare[0]}?)"
            )
        print(f"{PROG} {' '.join(words)}: bad config: {err}{hint}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return _resolve(command.run)(cfg, choices)


def _valid(words: tuple[str, ...], config_name: str, overrides: list[str]) -> bool:
    """Whether the config composed from ``overrides`` passes its checks; says why on stderr
    when not."""
    from vidgen.config import ConfigError, load_config_and_choices

    try:
        load_config_and_choices(config_name, overrides)
    except ConfigError as err:
        where = " ".join(words)
        print(f"\n{PROG} {where}: bad config (a run would refuse it): {err}", file=sys.stderr)
        return False
    return True


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

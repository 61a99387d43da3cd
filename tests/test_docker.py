"""docker/: the image recipe and the KubeRay RayJob agree with the code they run.

No Docker daemon or Kubernetes cluster is needed (none is on the CI machine): these tests read
the files and check what would otherwise only fail at build or deploy time.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workers.jobs.render import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile_copies() -> list[str]:
    sources = []
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
    return sources


def _ignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = Path(path).parts
    for pattern in patterns:
        pattern = pattern.removeprefix("**/")
        for i in range(len(parts)):
            if fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) or fnmatch.fnmatch(
                parts[i], pattern
            ):
                return True
    return False


def test_dockerfile_copies_what_the_install_needs():
    sources = _dockerfile_copies()
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert not _ignored(src), f"Dockerfile copies {src}, but .dockerignore excludes it"
    # setup.py installs vidgen, workers and configs (as vidgen.configs); pyproject reads README.
    for needed in ("pyproject.toml", "setup.py", "README.md", "vidgen", "workers", "configs"):
        assert needed in sources, f"Dockerfile does not copy {needed}"
    # The shipped models must reach the image: no ignore pattern may drop them.
    for asset in (ROOT / "vidgen" / "assets").glob("*.safetensors"):
        assert not _ignored(str(asset.relative_to(ROOT))), f".dockerignore drops {asset.name}"


def test_dockerignore_keeps_the_build_context_small():
    for heavy in ("runs/ca2vdm-tiny/state.safetensors", ".git/objects", ".venv-ci/bin/python"):
        assert _ignored(heavy), f".dockerignore lets {heavy} into the build context"


def test_rayjob_entrypoint_is_a_valid_batch_render_command():
    job = yaml.safe_load((ROOT / "docker" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "workers.jobs.render"]
    args = build_parser().parse_args(argv[3:])  # exits (fails the test) on an unknown flag
    assert args.address == "auto", "a RayJob driver must join the cluster KubeRay made"

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token", "token authentication must stay on"
    head = cluster["headGroupSpec"]["template"]["spec"]
    mounts = [m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])]
    for path in (args.manifest, args.out):
        assert any(str(path).startswith(m + "/") for m in mounts), (
            f"{path} is not on a volume mounted in the head pod (mounts: {mounts})"
        )
    workers = cluster["workerGroupSpecs"]
    gpus = sum(
        int(g["replicas"]) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in workers
        for c in g["template"]["spec"]["containers"]
    )
    assert gpus >= args.actors, f"{args.actors} actors need {args.actors} GPUs, workers have {gpus}"


@pytest.mark.parametrize("model", ["ca2vdm-tiny", "larp-tiny", "nbp-tiny"])
def test_train_gpu_script_calibrates_trains_and_exports(model, tmp_path):
    """docker/train_gpu.sh from a source checkout: the calibration sets train.steps from the
    measured step time (20 at least), the exported model (and the diffusion model's samples)
    land in OUT. Test-size models replace the presets through the trailing overrides."""
    from tests.models import save_test_generators
    from tests.test_train import SMALL_BOUNCING
    from vidgen import checkpoint
    from vidgen.io import read_video

    save_test_generators(tmp_path / "models")
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 = ours
        CALIBRATE="4",
        WHEELS=str(tmp_path / "no-wheels"),
        RUN_DIR=str(tmp_path / "run"),
        OUT=str(tmp_path / "out"),
        CUDA_VISIBLE_DEVICES="",  # fp32 on CPU even where a GPU is present
    )
    family = model.removesuffix("-tiny")
    models = tmp_path / "models"
    if family == "larp":
        overrides = [
            "tokenizer=larp-test",
            f"tokenizer.autoencoder={models / 'kl-test.safetensors'}",
            *SMALL_BOUNCING,
            "data.clip_len=4",
            "data.num_clips=8",
            "data.eval_clips=2",
        ]
    else:
        tokenizer = "kl" if family == "ca2vdm" else "larp"
        overrides = [
            f"model={family}-test",
            *SMALL_BOUNCING,
            "data.clip_len=8",
            "data.num_clips=8",
            f"frozen_tokenizer={models / f'{tokenizer}-test.safetensors'}",
            "model.num_actions=0",
        ]
    script = ROOT / "docker" / "train_gpu.sh"

    def run() -> dict:
        # A budget of 0 s gives the script's minimum of 20 steps on any machine.
        done = subprocess.run(
            ["bash", str(script), "run", model, "0", *overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = run()
    assert result["model"] == model and result["steps"] == 20
    assert result["precision"] == "fp32" and result["seconds_per_step"] > 0
    if family == "nbp":  # again in the same run folder: the cached tokens, a fresh state
        cache = next((tmp_path / "run").glob("tokens-*.safetensors"))
        before = cache.stat().st_mtime_ns
        assert run()["steps"] == 20 and cache.stat().st_mtime_ns == before
    ckpt = checkpoint.load(tmp_path / "out" / f"{model}.safetensors")
    kind = "tokenizer" if family == "larp" else "model"
    assert ckpt.card["steps"] == 20 and ckpt.card["run_config"][kind]["dim"] == 32
    assert (tmp_path / "out" / "train.log").read_text().count("vidgen.train.loop: step") >= 20
    samples = sorted(p.name for p in (tmp_path / "out").glob("step-*.mp4"))
    if family == "ca2vdm":
        assert samples == ["step-000010.mp4", "step-000020.mp4"]
        assert read_video(tmp_path / "out" / samples[-1]).float().std() > 1.0


def test_train_gpu_script_rejects_an_unknown_model_and_keys_it_sets():
    done = subprocess.run(
        ["bash", str(ROOT / "docker" / "train_gpu.sh"), "run", "sd-xl", "60"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "MODEL must be ca2vdm-tiny, larp-tiny or nbp-tiny" in done.stderr
    done = subprocess.run(
        ["bash", str(ROOT / "docker" / "train_gpu.sh"), "run", "nbp-tiny", "60", "train.steps=5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "train.steps=5 is set by the script" in done.stderr

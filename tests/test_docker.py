"""docker/: the image recipe and the KubeRay RayJob agree with the code they run.

No Docker daemon or Kubernetes cluster is needed (none is on the CI machine): these tests read
the files and check what would otherwise only fail at build or deploy time.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

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


def train_gpu(*args: str, env: dict | None = None, timeout: int = 60):
    """``bash docker/train_gpu.sh ARGS`` (stdout and stderr captured as text)."""
    # This machine has no GPU: the script refuses the CPU unless asked (ALLOW_CPU=1).
    env = dict(os.environ if env is None else env)
    env.setdefault("ALLOW_CPU", "1")
    return subprocess.run(
        ["bash", str(ROOT / "docker" / "train_gpu.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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


def test_train_gpu_script_run_calibrates_trains_exports_and_reads_its_cache(tmp_path):
    """docker/train_gpu.sh run, from a source checkout: the calibration sets train.steps from
    the measured step time (20 at least), the exported model and log land in OUT; the
    training run reads the tokens the calibration cached and starts from a fresh state (not
    the calibration's). Test-size models replace the presets through the trailing overrides
    (the other models: the `all` test below)."""
    from tests.models import save_test_generators
    from tests.test_train import SMALL_BOUNCING
    from vidgen import checkpoint

    models = tmp_path / "models"
    save_test_generators(models)
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 = ours
        CALIBRATE="4",
        WHEELS=str(tmp_path / "no-wheels"),
        RUN_DIR=str(tmp_path / "run"),
        OUT=str(tmp_path / "out"),
        CUDA_VISIBLE_DEVICES="",  # fp32 on CPU even where a GPU is present
    )
    overrides = [
        "model=nbp-test",
        *SMALL_BOUNCING,
        "data.clip_len=8",
        "data.num_clips=8",
        f"frozen_tokenizer={models / 'larp-test.safetensors'}",
        "model.num_actions=0",
    ]
    # A run folder used before keeps its cached tokens, never its state (a resume of it
    # would fail on these bytes).
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.safetensors").write_bytes(b"an earlier call's state")
    # A budget of 0 s gives the script's minimum of 20 steps on any machine.
    done = train_gpu("run", "nbp-tiny", "0", *overrides, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model"] == "nbp-tiny" and result["steps"] == 20
    assert result["precision"] == "fp32" and result["seconds_per_step"] > 0
    assert len(list((tmp_path / "run").glob("tokens-*-train-*.safetensors"))) == 1
    assert "encoding 8 clips" in (tmp_path / "run" / "calibrate.log").read_text()
    log = (tmp_path / "out" / "train.log").read_text()
    assert "encoding" not in log  # the calibration's cache, read
    # From step 1 of its own schedule: the calibration's state (4 steps of 1,000,000) gone.
    assert "step 1 {" in log and "resum" not in log.lower()
    assert log.count("vidgen.train.loop: step") >= 20
    ckpt = checkpoint.load(tmp_path / "out" / "nbp-tiny.safetensors")
    assert ckpt.card["steps"] == 20 and ckpt.card["run_config"]["model"]["dim"] == 32
    assert result["train_wall_s"] == ckpt.card["wall_seconds"]
    assert result["sha256"] == ckpt.sha256[:16]


def test_train_gpu_script_all_trains_three_lanes_then_benchmarks_them(tmp_path):
    """`train_gpu.sh all`: ca2vdm, larp then nbp on that new LARP, and nbp on the given LARP,
    side by side; then quality.py on the three generators and tokenizer.py on the new LARP;
    one JSON line last. Test-size models replace the presets through the per-family
    override lists."""
    from tests.models import save_test_generators
    from tests.test_train import SMALL_BOUNCING
    from vidgen import checkpoint
    from vidgen.generators import load_generator
    from vidgen.io import read_video
    from vidgen.tokenizers.larp import LARPVideoTokenizer

    models = tmp_path / "models"
    save_test_generators(models)
    kl, larp = models / "kl-test.safetensors", models / "larp-test.safetensors"
    small = " ".join(SMALL_BOUNCING)
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        CALIBRATE="4",
        WHEELS=str(tmp_path / "no-wheels"),
        # Run folders and OUT apart (as on the device: the repository's runs/ and $OUT): a
        # card's relative path only held when they were side by side. (Both lanes' folders
        # lie 4 deep, as the fetched copy below: the test LARP's autoencoder is a file named
        # relative to its run folder; on the device it is kl-tiny, a shipped name.)
        RUNS=str(tmp_path / "repo" / "runs"),
        OUT=str(tmp_path / "device" / "out" / "export"),
        THREADS="1",
        QUALITY_FRAMES="16",
        TOKENIZER_VIDEOS="1",
        CUDA_VISIBLE_DEVICES="",
        CA2VDM_OVERRIDES=f"model=ca2vdm-test {small} data.clip_len=8 data.num_clips=8 "
        f"frozen_tokenizer={kl} model.num_actions=0",
        LARP_OVERRIDES=f"tokenizer=larp-test tokenizer.autoencoder={kl} {small} "
        "data.clip_len=4 data.num_clips=8 data.eval_clips=2",
        NBP_OVERRIDES=f"model=nbp-test {small} data.clip_len=8 data.num_clips=8 "
        "model.num_actions=0",
        NBP_TOKENIZER=str(larp),
    )
    done = train_gpu("all", "0", env=env, timeout=900)
    out = tmp_path / "device" / "out" / "export"
    # Logs and samples come packed (the device tool returns 8 files at most): 5 files.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "ca2vdm-tiny/ca2vdm-tiny.safetensors",
        "larp-tiny/larp-tiny.safetensors",
        "logs.tgz",
        "nbp-tiny-new/nbp-tiny.safetensors",
        "nbp-tiny/nbp-tiny.safetensors",
    ], done.stderr[-2000:]
    with tarfile.open(out / "logs.tgz") as archive:
        archive.extractall(out, filter="data")
    logs = {p.name: p.read_text()[-1500:] for p in out.glob("*.log")}
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:], logs)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for lane, model in [
        ("ca2vdm-tiny", "ca2vdm-tiny"),
        ("larp-tiny", "larp-tiny"),
        ("nbp-tiny-new", "nbp-tiny"),
        ("nbp-tiny", "nbp-tiny"),
    ]:
        assert result[lane]["model"] == model and result[lane]["steps"] == 20, lane
        assert result[lane]["precision"] == "fp32" and result[lane]["seconds_per_step"] > 0
        ckpt = checkpoint.load(out / lane / f"{model}.safetensors")
        kind = "tokenizer" if model == "larp-tiny" else "model"
        assert ckpt.card["steps"] == 20 and ckpt.card["run_config"][kind]["dim"] == 32
        assert (out / lane / "train.log").read_text().count("vidgen.train.loop: step") >= 20
    samples = sorted(p.name for p in (out / "ca2vdm-tiny").glob("step-*.mp4"))
    assert samples == ["step-000010.mp4", "step-000020.mp4"]
    assert read_video(out / "ca2vdm-tiny" / samples[-1]).float().std() > 1.0
    for lane in ("ca2vdm-tiny", "nbp-tiny-new", "nbp-tiny"):
        assert 0 <= result["quality"][lane]["count_accuracy"] <= 1, lane
    assert result["quality"]["real_videos"]["count_accuracy"] > 0.5
    assert result["tokenizer"]["psnr_bouncing"] > 0 and "psnr_agent" in result["tokenizer"]
    # The new NBP was trained on the new LARP's tokens: its card pins that LARP.
    new_larp = LARPVideoTokenizer.from_pretrained(str(out / "larp-tiny" / "larp-tiny.safetensors"))
    # Its VQ warm-up (500 steps) was cut to half of its 20 steps: it quantises.
    assert int(new_larp.larp.quantizer.active) == 1
    assert "tokenizer.vq_warmup=500 -> 10" in (out / "larp-tiny.log").read_text()
    # Temporal patches of one frame (two stand objects still inside each patch; its card).
    assert (
        new_larp.config.patch_t == 1
        and LARPVideoTokenizer.from_pretrained(str(larp)).config.patch_t == 2
    )
    new_nbp = out / "nbp-tiny-new" / "nbp-tiny.safetensors"
    card = checkpoint.load(new_nbp).card
    assert card["tokenizer_fingerprint"] == new_larp.encoder_fingerprint()
    assert (
        checkpoint.load(out / "nbp-tiny" / "nbp-tiny.safetensors").card["tokenizer_fingerprint"]
        == LARPVideoTokenizer.from_pretrained(str(larp)).encoder_fingerprint()
    )
    # It names that LARP beside it, so the pair loads from OUT and wherever OUT is fetched to.
    assert card["tokenizer"] == "../larp-tiny/larp-tiny.safetensors"
    load_generator(str(new_nbp))
    fetched = tmp_path / "here" / "files" / "at"
    shutil.copytree(out, fetched)
    load_generator(str(fetched / "nbp-tiny-new" / "nbp-tiny.safetensors"))
    assert not (ROOT / "runs" / "gpu-all" / "larp-tiny" / "calibrate.log").exists() or (
        (ROOT / "runs" / "gpu-all" / "larp-tiny" / "calibrate.log").stat().st_mtime
        < (tmp_path / "models").stat().st_mtime
    ), "the lanes' run folders must follow RUNS"


def test_train_gpu_script_all_reports_failed_lanes_and_no_stale_models(tmp_path):
    """A lane that fails leaves no model (not even one of an earlier call in OUT), a failed
    LARP ends its lane before the NBP trained on it, and the call exits 1 with each lane's
    error in the JSON line."""
    out = tmp_path / "out"
    (out / "larp-tiny").mkdir(parents=True)
    (out / "larp-tiny" / "larp-tiny.safetensors").write_bytes(b"an earlier call's model")
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        WHEELS=str(tmp_path / "no-wheels"),
        RUNS=str(tmp_path / "runs"),
        OUT=str(out),
        CUDA_VISIBLE_DEVICES="",
        # Every lane fails at once on a frozen model that is not there (its config is
        # good, so the check before the lanes passes; no training, so the test is quick).
        CA2VDM_OVERRIDES="frozen_tokenizer=/no/such/kl.safetensors",
        LARP_OVERRIDES="tokenizer.autoencoder=/no/such/kl.safetensors",
        NBP_TOKENIZER="/no/such/larp.safetensors",
    )
    done = train_gpu("all", "0", env=env, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "logs.tgz").exists() and not list(out.glob("*.log"))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for lane in ("ca2vdm-tiny", "larp-tiny", "nbp-tiny"):
        assert "/no/such/" in result[lane]["error"], lane
    assert result["nbp-tiny-new"] is None  # never started: its LARP failed
    assert not list(out.glob("*/*.safetensors"))  # the earlier model is gone too
    assert result["quality"] == {} and result["tokenizer"] is None


def test_train_gpu_script_all_checks_every_lanes_config_before_any_lane_starts(tmp_path):
    """A bad override failed its lane alone, shown only in the JSON line at the end of the
    call, after the other lanes' whole budget (one device call lost). Every lane's config is
    now checked first: the call exits 2 at once, naming each bad lane, and starts none."""
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        WHEELS=str(tmp_path / "no-wheels"),
        RUNS=str(tmp_path / "runs"),
        OUT=str(tmp_path / "out"),
        CUDA_VISIBLE_DEVICES="",
        ALLOW_CPU="1",
        CA2VDM_OVERRIDES="model.context_noise_max=-3",  # a value the model refuses
        LARP_OVERRIDES="no_such_key=1",
        NBP_OVERRIDES="model.dim=64",  # a good one: not named
    )
    done = train_gpu("all", "600", env=env, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "lane ca2vdm-tiny: bad config: model: context_noise_max must be" in done.stderr
    assert "lane larp-tiny: bad config: " in done.stderr and "no_such_key" in done.stderr
    assert "lane nbp-tiny" not in done.stderr
    assert not list((tmp_path / "runs" / "gpu-all" / "logs").glob("*.log"))  # none started
    done = train_gpu("all", "600", env={**env, "NBP_OVERRIDES": "train.steps=5"}, timeout=120)
    assert done.returncode == 2 and "train.steps=5 is set by the script" in done.stderr


def test_train_gpu_script_all_packs_its_logs_when_killed_by_a_timeout(tmp_path):
    """An outer `timeout` (SIGTERM to the process group) killed `all` before it packed its
    logs: the device tool would have brought back 8 of its loose files at random. The logs
    are now written outside OUT and packed into it."""
    import signal
    import time

    out = tmp_path / "out"
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        ALLOW_CPU="1",
        CALIBRATE="100000",  # every lane is still calibrating when the timeout comes
        WHEELS=str(tmp_path / "no-wheels"),
        RUNS=str(tmp_path / "runs"),
        OUT=str(out),
        THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    proc = subprocess.Popen(
        ["bash", str(ROOT / "docker" / "train_gpu.sh"), "all", "10"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lane_log = tmp_path / "runs" / "gpu-all" / "logs" / "ca2vdm-tiny.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lane_log.exists() and lane_log.stat().st_size):
        time.sleep(0.2)
    time.sleep(2)
    # Nothing but models ever lies in OUT: a call killed outright (SIGKILL, no time to
    # pack) brings back every model, not 8 files of models and logs at random.
    assert lane_log.stat().st_size and not [p for p in out.rglob("*") if p.is_file()]
    os.killpg(proc.pid, signal.SIGTERM)  # what `timeout` does
    proc.communicate(timeout=120)
    assert proc.returncode == 124
    assert (out / "logs.tgz").exists() and not list(out.rglob("*.log"))
    with tarfile.open(out / "logs.tgz") as archive:
        assert "ca2vdm-tiny.log" in archive.getnames()


def test_train_gpu_script_refuses_to_train_on_the_cpu_unless_asked(tmp_path):
    """A GPU run that found no GPU trained on the CPU for its whole budget and exited 0."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WHEELS=str(tmp_path / "no-wheels"))
    env["ALLOW_CPU"] = "0"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = train_gpu("run", "nbp-tiny", "60", env=env)
    assert done.returncode == 3 and "no CUDA device" in done.stderr, done.stderr[-2000:]


def test_train_gpu_script_rejects_an_unknown_model_and_keys_it_sets():
    done = train_gpu("run", "sd-xl", "60")
    assert done.returncode == 2
    assert "MODEL must be ca2vdm-tiny, larp-tiny or nbp-tiny" in done.stderr
    done = train_gpu("all")
    assert done.returncode == 2 and "usage:" in done.stderr and "all SECONDS" in done.stderr
    # Refused before the Python setup: without CUDA this exited 3, not naming the key.
    no_cuda = dict(os.environ, ALLOW_CPU="0", CUDA_VISIBLE_DEVICES="")
    for key in ("train.steps=5", "++train.steps=5", "+train.max_seconds=9"):
        done = train_gpu("run", "nbp-tiny", "60", key, env=no_cuda)
        assert done.returncode == 2 and f"{key} is set by the script" in done.stderr


def test_train_gpu_script_refuses_numbers_with_a_leading_zero_and_out_in_the_run_folder(
    tmp_path,
):
    """08 passed the check, then bash (bad octal) or Python refused it after the whole
    calibration; OUT equal to RUN_DIR copied the export onto itself after the training."""
    no_cuda = dict(os.environ, ALLOW_CPU="0", CUDA_VISIBLE_DEVICES="")
    for args, env in (
        (("run", "nbp-tiny", "08"), no_cuda),
        (("all", "09"), no_cuda),
        (("run", "nbp-tiny", "60"), {**no_cuda, "CALIBRATE": "010"}),
    ):
        done = train_gpu(*args, env=env)
        assert done.returncode == 2 and "must be a whole number" in done.stderr, done.stderr
    same = {**no_cuda, "RUN_DIR": str(tmp_path / "run"), "OUT": str(tmp_path / "run" / ".")}
    done = train_gpu("run", "nbp-tiny", "60", env=same)
    assert done.returncode == 2 and "OUT must be another folder" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()

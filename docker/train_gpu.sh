#!/usr/bin/env bash
# One prepared training run of a shipped default on a CUDA machine, in one command, for a
# Python that has torch, numpy, einops, safetensors, tqdm, scipy and pyyaml but neither
# vidgen's other requirements nor network access (a bare CUDA image). vidgen runs from this
# source checkout (PYTHONPATH, configs/ found beside the package); training needs no PyAV,
# decord or Ray (sample videos are written as .npy when PyAV is missing).
#
# (Hydra also imports packaging, Gymnasium typing_extensions: the torch images have both.)
#
#   bash docker/train_gpu.sh fetch
#       here, with network or a local index: Hydra (+ omegaconf, antlr4) and Gymnasium as
#       pure-Python wheels into .whl/ (about 1 MB; ignored by git, carry it to the machine)
#   bash docker/train_gpu.sh run MODEL SECONDS [override ...]
#       there: installs .whl/ (or $WHEELS) into /tmp/site when present, times $CALIBRATE (40)
#       steps, sets train.steps so that the run fills about SECONDS of training (cosine
#       schedule over the whole run, samples at the half), trains, and copies the exported
#       model (its card is in the file's metadata), the samples and the log to $OUT (default
#       $RUN_DIR/export; RUN_DIR defaults to runs/gpu-MODEL); prints one JSON line last.
#       Relative RUN_DIR, OUT, RUNS and WHEELS are taken from the repository root (the
#       script runs there), not from the folder it was called in.
#       MODEL is ca2vdm-tiny, larp-tiny or nbp-tiny, each over the shipped frozen tokenizer, so a generator can replace its file
#       in vidgen/assets/ as is; a new larp-tiny needs nbp-tiny trained on it after it
#       (frozen_tokenizer=<its path>). Extra Hydra overrides go last (e.g. train.threads=8).
#   bash docker/train_gpu.sh all SECONDS
#       there: every default in one call, side by side on the one GPU (see all() below), then
#       the quality and tokenizer benchmarks of what it made; one JSON line last. Every
#       lane's config is checked first: a bad override exits 2 at once, naming its lane.
#
# Before the SECONDS of training come the data (procedural clips rendered on the CPU, then
# encoded once by the frozen tokenizer on the training device), the calibration and the
# sample videos. Example (the device tool: `carry` [".whl"], then, within one call's 600 s;
# on an H200 `all 270` needed about 450 s to its last export and 2 min of benchmarks after):
#   timeout 580 bash docker/train_gpu.sh all 200   (as README.md gives: the timeout leaves
#   the tool time to bring back $OUT, logs.tgz included, before its own limit)
set -euo pipefail
cd "$(dirname "$0")/.."

fetch() {
    local pip=(python3 -m pip)
    mkdir -p .whl
    "${pip[@]}" download --no-deps --only-binary=:all: -d .whl hydra-core==1.3.8 omegaconf==2.3.1 \
        gymnasium==1.4.0 farama-notifications==0.0.6
    # antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published as a source
    # archive only: build its pure-Python wheel here so the GPU machine needs no build step.
    "${pip[@]}" wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
    rm -f .whl/*.tar.gz
    ls -l .whl
}

model_args() {
    case "$1" in
        ca2vdm-tiny)
            echo "model=ca2vdm-tiny data=bouncing data.clip_len=32 data.batch_size=32" \
                "data.num_clips=8192 train.lr=3e-4 train.warmup=500" \
                "frozen_tokenizer=kl-tiny" ;;
        larp-tiny)
            # Temporal patches of one frame: with the shipped two, the decoder gives both
            # frames of a patch nearly the same picture (objects stand still, then jump;
            # larp-tiny's card). A new LARP from scratch, so no init=larp-tiny here.
            echo "tokenizer=larp-tiny tokenizer.tau=0.01 tokenizer.patch_t=1 data=mix" \
                "data.clip_len=8 data.batch_size=64 data.num_clips=8192 train.lr=1e-3" \
                "train.warmup=200 train.ema_decay=0 tokenizer.vq_warmup=500" ;;
        nbp-tiny)
            echo "model=nbp-tiny data=bouncing data.clip_len=32 data.batch_size=64" \
                "data.num_clips=16384 frozen_tokenizer=larp-tiny" ;;
        *)
            echo "train_gpu.sh: MODEL must be ca2vdm-tiny, larp-tiny or nbp-tiny, got '$1'" >&2
            return 2 ;;
    esac
}

# Seconds per step between the log lines of steps FIRST and LAST in LOG.
seconds_per_step() {
    python3 - "$1" "$2" "$3" <<'EOF'
import re, sys
from datetime import datetime
log, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = {}
for line in open(log, errors="replace").read().replace("\r", "\n").splitlines():
    m = re.match(r"(\S+ \S+),(\d+) vidgen\.train\.loop: step (\d+) ", line)
    if m:
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3
        times[int(m.group(3))] = t
if first not in times or last not in times:
    sys.exit(f"train_gpu.sh: no timing lines for steps {first} and {last} in {log}")
print(f"{(times[last] - times[first]) / (last - first):.6f}")
EOF
}

# Wheels from $WHEELS (default .whl) into /tmp/site, this checkout and them on PYTHONPATH;
# once per process tree (the lanes of `all` share it).
setup_python() {
    [[ -n "${TRAIN_GPU_PYTHON_READY:-}" && -n "${TRAIN_GPU_DEVICE:-}" ]] && return 0
    local wheels=${WHEELS:-.whl}
    if compgen -G "$wheels/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$wheels"/*.whl
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRAIN_GPU_PYTHON_READY=1
    # What training imports, checked before any work (a missing one failed the first
    # training call, minutes in); scipy only the benchmarks need. The device is found here
    # once (torch takes seconds to import) for every run of the process tree.
    TRAIN_GPU_DEVICE=$(python3 - <<'EOF'
import importlib.util, sys
need = ["torch", "numpy", "einops", "safetensors", "tqdm", "yaml", "packaging", "hydra",
        "omegaconf", "antlr4", "gymnasium"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"train_gpu.sh: missing Python modules {missing}: carry them as wheels (fetch)")
if importlib.util.find_spec("scipy") is None:
    print("train_gpu.sh: no scipy: training works, benchmarks/*.py will fail", file=sys.stderr)
import torch
print("cuda" if torch.cuda.is_available() else "cpu")
EOF
)
    export TRAIN_GPU_DEVICE
    # A GPU run that found no GPU would train on the CPU for its whole budget and return
    # models worth nothing: refused, unless asked for (the tests, a CPU machine on purpose).
    if [[ "$TRAIN_GPU_DEVICE" != cuda && "${ALLOW_CPU:-0}" != 1 ]]; then
        echo "train_gpu.sh: no CUDA device (torch.cuda.is_available() is False); set" \
            "ALLOW_CPU=1 to train on the CPU" >&2
        exit 3
    fi
}

# Overrides of the keys run() sets itself are refused (status 1, naming the first).
refuse_script_keys() {
    local override
    for override in "$@"; do
        # +key= and ++key= name the key too. (The log, eval and checkpoint cadences the
        # script sets come after the caller's overrides: its own are used.)
        case "${override#"${override%%[!+]*}"}" in
            name=* | out=* | train.steps=* | train.stop_at=* | train.resume=* | \
                train.max_seconds=*)
                echo "train_gpu.sh: $override is set by the script (RUN_DIR, OUT, SECONDS)" >&2
                return 1 ;;
        esac
    done
}

# Each (LANE, WORDS) pair's training config composed and checked as its run would (vidgen's
# own checks, without making data or models): every bad lane named on stderr, status 2.
check_lanes() {
    python3 - "$@" <<'EOF' || return 2
import sys
from vidgen.config import load_config

args, bad = sys.argv[1:], []
for lane, words in zip(args[::2], args[1::2]):
    try:
        load_config("train", words.split())
    except ValueError as err:  # ConfigError: an unknown key, a bad value
        bad.append(f"train_gpu.sh: lane {lane}: bad config: {err}")
if bad:
    sys.exit("\n".join(bad))
EOF
}

run() {
    local name="$1" seconds="$2"
    shift 2
    local args
    args=$(model_args "$name")
    local run_dir="${RUN_DIR:-runs/gpu-$name}"
    local out="${OUT:-$run_dir/export}"
    # Refused before the Python setup (minutes on a bare machine; without CUDA it exited 3,
    # not naming the argument) and before any folder is made.
    refuse_script_keys "$@" || return 2
    if [[ "$(realpath -m -- "$out")" == "$(realpath -m -- "$run_dir")" ]]; then
        # the export was copied onto itself, after the whole training (cp failed, exit 1)
        echo "train_gpu.sh: OUT must be another folder than the run folder ($run_dir)" >&2
        return 2
    fi
    setup_python
    local precision=fp32
    [[ "$TRAIN_GPU_DEVICE" == cuda ]] && precision=bf16
    mkdir -p "$run_dir" "$out"
    local train=(python3 -m vidgen.cli train $args train.precision=$precision "$@"
        name="$name" out="$run_dir" train.resume=true train.ckpt_every=1000000)
    # A run folder used before keeps its cached latents or tokens, never its state; OUT
    # keeps nothing of an earlier run (a failed run must not leave an older model there).
    rm -f "$run_dir/state.safetensors" "$run_dir/$name.safetensors"
    rm -rf "$run_dir/samples"
    rm -f "$out/$name.safetensors" "$out/train.log" "$out"/step-*
    # Calibration: CALIBRATE steps of a long schedule, stopped early (no export, no samples),
    # timed over the second half. The frozen tokenizer's latents or tokens are computed and
    # cached in the run folder on the way, so the real run starts at once.
    local calibrate=${CALIBRATE:-40}
    "${train[@]}" train.steps=1000000 train.stop_at="$calibrate" train.log_every=1 \
        train.eval_every=1000000 2>&1 | tee "$run_dir/calibrate.log"
    rm -f "$run_dir/state.safetensors"
    local per_step steps
    per_step=$(seconds_per_step "$run_dir/calibrate.log" $(( calibrate / 2 )) "$calibrate")
    steps=$(python3 -c "print(max(20, int($seconds / $per_step) // 10 * 10))")
    echo "train_gpu.sh: $per_step s/step -> train.steps=$steps for about $seconds s"
    # A LARP whose VQ warm-up outlasts its run would never quantise (training refuses it):
    # a short run warms up for half its steps at most.
    local word warmup="" extra=()
    for word in $args "$@"; do
        case "$word" in tokenizer.vq_warmup=*) warmup=${word#*=} ;; esac
    done
    if [[ -n "$warmup" ]] && (( warmup > steps / 2 )); then
        extra=(tokenizer.vq_warmup=$(( steps / 2 )))
        echo "train_gpu.sh: tokenizer.vq_warmup=$warmup -> $(( steps / 2 )) (half of $steps steps)"
    fi
    local start=$SECONDS
    # Steps timed under one load can run slower under another (the lanes of `all`): a time
    # box of 1.25 x SECONDS + 30 s exports the model as it is rather than overrun the call.
    "${train[@]}" ${extra[@]+"${extra[@]}"} train.steps="$steps" \
        train.log_every=$(( (steps + 99) / 100 )) \
        train.eval_every=$(( steps / 2 )) train.max_seconds=$(( seconds * 5 / 4 + 30 )) \
        2>&1 | tee "$run_dir/train.log"
    local wall=$(( SECONDS - start ))
    # The log and samples go to $LOG_OUT when set (`all`: outside $OUT, packed at the end).
    local logs="${LOG_OUT:-$out}"
    mkdir -p "$logs"
    cp "$run_dir/$name.safetensors" "$out/"
    cp "$run_dir/train.log" "$logs/"
    if [[ -d "$run_dir/samples" ]]; then cp "$run_dir"/samples/* "$logs/"; fi
    # What was trained, read back from the exported file's card (its header alone: no torch
    # to import, seconds per lane).
    python3 - "$out/$name.safetensors" "$per_step" "$wall" <<'EOF'
import hashlib, json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="np") as f:
    card = json.loads(f.metadata()["card"])
digest = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
sha256 = digest.hexdigest()
print(json.dumps({
    "model": card["run_config"]["name"],
    "steps": card["steps"],
    "precision": card["train_config"]["precision"],
    "seconds_per_step": float(sys.argv[2]),
    "wall_s": int(sys.argv[3]),
    "train_wall_s": card.get("wall_seconds"),
    "sha256": sha256[:16],
}))
EOF
}

# Every default in one call, three lanes side by side on the one GPU (models this small
# leave most of it idle): ca2vdm-tiny for SECONDS; larp-tiny for SECONDS/2, then nbp-tiny on
# that new LARP for SECONDS/2 (a pair to ship together); nbp-tiny on the shipped larp-tiny
# (or $NBP_TOKENIZER) for SECONDS. Then, side by side, benchmarks/quality.py on the new
# generators and benchmarks/tokenizer.py on the new LARP. Each lane's model is in
# $OUT/<lane>/ and nothing else is ever in $OUT but $OUT/logs.tgz: the device tool brings
# back 8 files at most, and a call killed outright (no time to pack) still returns every
# model. The logs (each lane's output <lane>.log, its train.log and samples in <lane>/, the
# benchmarks' logs) are written to $RUNS/gpu-all/logs and packed into $OUT/logs.tgz at the
# end, or on SIGTERM (run folders: $RUNS/gpu-all/<lane>, default runs/). A failed lane does
# not stop the others (the exit status says one failed). Extra overrides per family:
# $CA2VDM_OVERRIDES, $LARP_OVERRIDES, $NBP_OVERRIDES (space-separated words).
all() {
    local seconds="$1"
    setup_python
    local out="${OUT:-runs/gpu-all/export}" half=$(( $1 / 2 ))
    local threads=${THREADS:-$(( $(nproc) / 3 > 0 ? $(nproc) / 3 : 1 ))}
    local device=$TRAIN_GPU_DEVICE
    local runs=${RUNS:-runs}
    mkdir -p "$out" "$runs/gpu-all/logs"
    out=$(cd "$out" && pwd)
    local logs
    logs=$(cd "$runs/gpu-all/logs" && pwd)
    # Nothing of an earlier call may pass for this one's (a failed lane leaves no model).
    local lane
    for lane in ca2vdm-tiny larp-tiny nbp-tiny-new nbp-tiny; do
        rm -rf "${out:?}/$lane" "$out/$lane.log" "${logs:?}/$lane" "$logs/$lane.log"
    done
    rm -f "$out/quality.log" "$out/tokenizer.log" "$out/logs.tgz" "$logs/quality.log" \
        "$logs/tokenizer.log"
    local common=(train.threads="$threads" data.num_workers=4)
    # Every lane's overrides are checked before any lane starts (seconds): a bad one failed
    # its lane alone, which the call showed only in its JSON line, after the others' whole
    # budget. The override lists are word lists (unquoted on purpose).
    local precision=fp32
    [[ "$device" == cuda ]] && precision=bf16
    refuse_script_keys ${CA2VDM_OVERRIDES:-} ${LARP_OVERRIDES:-} ${NBP_OVERRIDES:-} || return 2
    local lane_words=()
    for lane in ca2vdm-tiny larp-tiny nbp-tiny; do
        local extra_var=${lane%%-*}
        extra_var=${extra_var^^}_OVERRIDES
        lane_words+=("$lane" "$(model_args "$lane") train.precision=$precision ${common[*]} ${!extra_var:-}")
    done
    check_lanes "${lane_words[@]}" || return 2
    # Killed by an outer timeout: the lanes stop, and what they wrote is packed to come back.
    trap 'pack_logs "$logs" "$out"; exit 124' TERM
    # The override lists are word lists (unquoted on purpose).
    (RUN_DIR="$runs/gpu-all/ca2vdm-tiny" OUT="$out/ca2vdm-tiny" LOG_OUT="$logs/ca2vdm-tiny" \
        run ca2vdm-tiny "$seconds" "${common[@]}" ${CA2VDM_OVERRIDES:-}) \
        >"$logs/ca2vdm-tiny.log" 2>&1 &
    local lane_a=$!
    # `;` and not `&&`: set -e stays on inside the first run (a failed LARP ends the lane).
    # The run folders are named as the lanes' folders in $out: the new NBP's card names its
    # LARP relative to its own folder (../larp-tiny/larp-tiny.safetensors), which then
    # holds in $out too, and wherever $out is fetched to.
    ( (RUN_DIR="$runs/gpu-all/larp-tiny" OUT="$out/larp-tiny" LOG_OUT="$logs/larp-tiny" \
        run larp-tiny "$half" "${common[@]}" ${LARP_OVERRIDES:-}) >"$logs/larp-tiny.log" 2>&1
        (RUN_DIR="$runs/gpu-all/nbp-tiny-new" OUT="$out/nbp-tiny-new" \
            LOG_OUT="$logs/nbp-tiny-new" \
            run nbp-tiny "$half" "${common[@]}" ${NBP_OVERRIDES:-} \
            frozen_tokenizer="$runs/gpu-all/larp-tiny/larp-tiny.safetensors") \
        >"$logs/nbp-tiny-new.log" 2>&1) &
    local lane_b=$!
    (RUN_DIR="$runs/gpu-all/nbp-tiny" OUT="$out/nbp-tiny" LOG_OUT="$logs/nbp-tiny" \
        run nbp-tiny "$seconds" "${common[@]}" ${NBP_OVERRIDES:-} \
        frozen_tokenizer="${NBP_TOKENIZER:-larp-tiny}") >"$logs/nbp-tiny.log" 2>&1 &
    local lane_c=$!
    local failed=0
    wait $lane_a || failed=1
    wait $lane_b || failed=1
    wait $lane_c || failed=1
    # The two benchmarks side by side too (quality.py takes about 2 min on an H200 for
    # QUALITY_FRAMES=256).
    local models=() file bench=()
    for lane in ca2vdm-tiny nbp-tiny-new nbp-tiny; do
        for file in "$out/$lane"/*.safetensors; do
            if [[ -f "$file" ]]; then models+=("$file"); fi
        done
    done
    if [[ -f "$out/larp-tiny/larp-tiny.safetensors" ]]; then
        python3 benchmarks/tokenizer.py --model "$out/larp-tiny/larp-tiny.safetensors" \
            --videos "${TOKENIZER_VIDEOS:-12}" --device "$device" --threads "$threads" \
            >"$logs/tokenizer.log" 2>&1 &
        bench+=($!)
    fi
    if [[ ${#models[@]} -gt 0 ]]; then
        python3 benchmarks/quality.py --models "$(IFS=,; echo "${models[*]}")" \
            --frames "${QUALITY_FRAMES:-256}" --seeds 0,1 --device "$device" \
            --threads "$threads" >"$logs/quality.log" 2>&1 &
        bench+=($!)
    fi
    local pid
    for pid in ${bench[@]+"${bench[@]}"}; do
        wait "$pid" || failed=1
    done
    # One JSON line last: each lane's result line (or the end of its log) and the benchmarks'.
    python3 - "$logs" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])  # the logs folder


def last_json(name):
    path = out / name
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {"error": text[-600:]}


lanes = ("ca2vdm-tiny", "larp-tiny", "nbp-tiny-new", "nbp-tiny")
result = {lane: last_json(f"{lane}.log") for lane in lanes}
quality = last_json("quality.log") or {}
result["quality"] = {
    Path(k).parent.name if k.endswith(".safetensors") else k: v.get("summary", v)
    for k, v in quality.items()
    if isinstance(v, dict) and (k.endswith(".safetensors") or k == "real_videos")
}
if "error" in quality:  # the benchmark failed: the end of its log
    result["quality"]["error"] = quality["error"]
result["tokenizer"] = last_json("tokenizer.log")
print(json.dumps(result))
EOF
    pack_logs "$logs" "$out" || failed=1
    trap - TERM
    return $failed
}

# The device tool brings back at most 8 files: the logs and samples written to $1 go into
# one archive, $2/logs.tgz (`tar xzf` it). Also on SIGTERM (an outer `timeout`).
pack_logs() {
    local logs="$1" out="$2" file packed=()
    while IFS= read -r file; do packed+=("${file#"$logs"/}"); done < <(
        find "$logs" -type f \( -name '*.log' -o -name 'step-*' \) | sort)
    [[ ${#packed[@]} -gt 0 ]] || return 0
    tar czf "$out/logs.tgz" -C "$logs" -- "${packed[@]}"
}

# SECONDS and CALIBRATE are whole numbers (shell arithmetic); calibration times the second
# half of its steps, so it needs at least 2.
check_numbers() {
    # No leading zero: bash reads 08 as bad octal (010 as 8), Python refuses it, both after
    # the calibration.
    if ! [[ "$1" =~ ^(0|[1-9][0-9]*)$ ]]; then
        echo "train_gpu.sh: SECONDS must be a whole number, got '$1'" >&2
        exit 2
    fi
    if ! [[ "${CALIBRATE:-40}" =~ ^[1-9][0-9]*$ ]] || (( ${CALIBRATE:-40} < 2 )); then
        echo "train_gpu.sh: CALIBRATE must be a whole number >= 2, got '${CALIBRATE:-}'" >&2
        exit 2
    fi
}

case "${1:-}" in
    fetch) fetch ;;
    run)
        [[ $# -ge 3 ]] || { echo "usage: $0 run MODEL SECONDS [override ...]" >&2; exit 2; }
        check_numbers "$3"
        run "${@:2}" ;;
    all)
        [[ $# -eq 2 ]] || { echo "usage: $0 all SECONDS" >&2; exit 2; }
        check_numbers "$2"
        all "$2" ;;
    *) echo "usage: $0 fetch | run MODEL SECONDS [override ...] | all SECONDS" >&2; exit 2 ;;
esac

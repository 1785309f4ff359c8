#!/usr/bin/env bash
# Check graphopt on one CUDA GPU with one command, in at most 8 minutes.
#
#   scripts/gpu_check.sh             # from the repository root, on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run   # the same steps on the CPU at tiny sizes (or GPU_CHECK_DRY_RUN=1),
#                                    # with one Inductor cache kept in gpu_check_out/inductor-cache
#
# Steps, in this order, each under its own `timeout` and all under one budget (GPU_CHECK_BUDGET_S,
# default 480 s on a GPU; a step that would start with under 15 s left is skipped and says so, and
# a step's limit is cut to what is left). A step that fails or times out is recorded and the next
# one runs. The short op benchmarks come first, so that a budget cut falls on the last preset:
#   env            GPU, driver and package versions (env.json)
#   op-varlen      examples/bench_varlen_attention.py (32768 tokens, 16/4 heads, head dim 128; the
#                  impl each graphopt variant ran, TFLOP/s of useful causal FLOPs)
#   op-lce         examples/bench_linear_cross_entropy.py (16384 x 2048 -> 128256; Liger when it imports)
#   tests-*        pytest on each selection in PYTEST_SELECTIONS below (JUnit XML kept)
#   explain        python -m graphopt explain --device cuda --dtype bfloat16: one tiny training step
#   bench-packed   python -m graphopt.bench --config packed (16384 tokens, hidden 1024, vocab 32000)
#   bench-padded   python -m graphopt.bench --config padded (B=8 S=2048, hidden 1024, vocab 32000)
#   bench-loss     python -m graphopt.bench --config loss   (B=8 S=2048, hidden 2048, vocab 128256)
# The model benchmarks run eager, inductor and graphopt, each in its own process with a cold
# Inductor cache, in bf16 on the GPU.
#
# Installs nothing from the network. Packages come from the Python environment (CUDA torch,
# triton, transformers, pytest). Wheels in .whl/ (optional; keep that folder out of git) are
# installed first, with `pip install --no-index --no-deps --target`, into a temporary folder put
# first on PYTHONPATH. Build them on a machine that has a package registry, for the GPU machine's
# Python, one version of each package, for example:
#   pip wheel --no-deps --no-build-isolation -w .whl .                         # graphopt itself
#   pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5     # the Liger anchor
# Without .whl/ nothing is installed. Either way the code that runs is this checkout's: Python
# finds graphopt in the current folder before any installed copy. graphopt.passes lives in
# passes/ and only an install maps it into the package, so when `import graphopt.passes` does not
# give this checkout's passes/ (no install, or one of another copy), the script links
# graphopt/passes -> ../passes for the run and removes the link at the end.
#
# Without .git (a copied tree), set GRAPHOPT_REVISION=<commit> so that the results name the code.
#
# Output goes to $OUT if it is set, else to gpu_check_out/ (whose logs/ keeps the files unpacked):
#   gpu_check.tar.gz        every log, JSON result and JUnit report
#   gpu_check_summary.md    the markdown summary printed at the end: each step's status, wall time
#                           and key numbers (ms per step per backend, speed-ups, peak memory, op times),
#                           then the rows for docs/benchmarks.md's GPU tables
# Both are rewritten after every step, so a run that is cut short still leaves what it did.
# Exit status: 0 when no step failed or timed out.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1

# ---- what runs (edit here) -------------------------------------------------------------------
# One pytest run per entry, "NAME|ARGS" (ARGS split on spaces). Add a model-level selection here
# when one exists, e.g. "tests-model|tests/passes -m cuda". A test module that cannot be
# imported (say hypothesis is missing) fails the step without stopping the other modules' tests.
PYTEST_SELECTIONS=("tests-cuda|-m cuda --continue-on-collection-errors")
if [[ "$DRY_RUN" == 1 ]]; then
    DEVICE=cpu
    BUDGET_S=${GPU_CHECK_BUDGET_S:-900}
    TIMEOUT_SCALE=4   # CPU compiles are slow
    # Compile times mean nothing here: every step shares one Inductor cache that outlives the run,
    # so a second dry run recompiles little.
    export TORCHINDUCTOR_CACHE_DIR=$ROOT/gpu_check_out/inductor-cache
    BENCH_STEPS="--steps 2 --warmup 0 --warm-cache"
    LOSS_SIZES="--batch 2 --seq 64 --hidden 64 --layers 1 --vocab 1000"
    PACKED_SIZES="--tokens 256 --doc-len 32-96 --hidden 64 --layers 1 --vocab 500"
    PADDED_SIZES="--batch 2 --seq 64 --hidden 64 --layers 1 --vocab 500"
    LCE_SIZES="--tokens 64 --hidden 32 --vocab 1000 --warmup 1 --repeats 1"
    VARLEN_SIZES="--tokens 256 --heads 4 --kv-heads 2 --head-dim 16 --doc-len-range 16 64 --warmup 1 --repeats 1"
else
    DEVICE=cuda
    BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
    TIMEOUT_SCALE=1
    BENCH_STEPS="--steps 10 --warmup 3"
    LOSS_SIZES="--batch 8 --seq 2048 --hidden 2048 --layers 2 --vocab 128256"
    PACKED_SIZES="--tokens 16384 --hidden 1024 --layers 2 --vocab 32000"
    PADDED_SIZES="--batch 8 --seq 2048 --hidden 1024 --layers 2 --vocab 32000"
    LCE_SIZES="--tokens 16384 --hidden 2048 --vocab 128256 --warmup 2 --repeats 10"
    VARLEN_SIZES="--tokens 32768 --heads 16 --kv-heads 4 --head-dim 128 --warmup 2 --repeats 20"
fi
DTYPE=bfloat16
# The padded preset measures the guard's cost per call but skips the step delta (a second compile).
PADDED_GUARD="--no-guard-step-delta"

# ---- where output goes -----------------------------------------------------------------------
if [[ -n "${OUT:-}" ]]; then
    DEST=$OUT
    LOGS=$(mktemp -d -t gpu_check.XXXXXX)
else
    DEST=$ROOT/gpu_check_out
    LOGS=$DEST/logs
    rm -rf "$LOGS"
fi
mkdir -p "$DEST" "$LOGS"
SITE=""
LINKED_PASSES=0
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
export PYTHONUNBUFFERED=1

publish() {  # rewrite the archive and the summary from what is in $LOGS now
    "$PY" "$ROOT/scripts/gpu_check_summary.py" "$LOGS" --out "$LOGS/summary.md" >/dev/null 2>&1
    cp -f "$LOGS/summary.md" "$DEST/gpu_check_summary.md" 2>/dev/null
    tar -czf "$DEST/gpu_check.tar.gz.part" -C "$LOGS" . && mv -f "$DEST/gpu_check.tar.gz.part" "$DEST/gpu_check.tar.gz"
}

cleanup() {
    [[ "$LINKED_PASSES" == 1 ]] && rm -f "$ROOT/graphopt/passes"
    [[ -n "$SITE" ]] && rm -rf "$SITE"
    [[ -n "${OUT:-}" ]] && rm -rf "$LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run_step NAME KIND LIMIT_S COMMAND...: run COMMAND under `timeout`, output to $LOGS/NAME.log,
# one line per step to $LOGS/steps.tsv (name, kind, status, exit code, wall s, limit, command).
run_step() {
    local name=$1 kind=$2 limit=$(($3 * TIMEOUT_SCALE)) status rc start wall
    shift 3
    local left=$((DEADLINE - $(date +%s)))
    local shown="$*"
    shown=${shown//$LOGS/LOGS}
    shown=${shown//$ROOT\//}
    if ((left < 15)); then
        printf '%s\t%s\tskipped\t-\t0\t%s\t%s\n' "$name" "$kind" "$limit" "$shown" >>"$LOGS/steps.tsv"
        echo "[gpu_check] $name: skipped, the ${BUDGET_S} s budget is spent"
        publish
        return
    fi
    ((limit > left - 5)) && limit=$((left - 5))  # - 5: the kill after the limit stays in budget
    echo "[gpu_check] $name (limit ${limit} s): $shown"
    start=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case "$rc" in
        0) status=pass ;;
        124 | 137) status=timeout ;;
        5) [[ "$kind" == pytest ]] && status="no tests" || status=fail ;;
        *) status=fail ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$status" "$rc" "$wall" "$limit" "$shown" >>"$LOGS/steps.tsv"
    echo "[gpu_check] $name: $status in ${wall} s"
    if [[ "$status" == fail || "$status" == timeout ]]; then
        grep -v '^\[bench' "$LOGS/$name.log" | tail -n 6 | sed 's/^/    /'
    fi
    publish
}

# ---- packages: optional local wheels, then graphopt from this checkout ---------------------------
setup_packages() {
    echo "dry run: $DRY_RUN; device: $DEVICE; budget: ${BUDGET_S} s; $("$PY" --version 2>&1)"
    if compgen -G ".whl/*.whl" >/dev/null; then
        SITE=$(mktemp -d -t gpu_check_site.XXXXXX)
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
            echo "installed from .whl/:" .whl/*.whl
        else
            echo "pip could not install .whl/*.whl; going on without them"
            rm -rf "$SITE"
            SITE=""
        fi
    else
        echo "no .whl/ folder: nothing installed"
    fi
    export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
    local probe="import os, graphopt.passes as p; assert os.path.samefile(p.__path__[0], 'passes')"
    if ! "$PY" -c "$probe" >/dev/null 2>&1 && [[ -d passes && ! -e graphopt/passes ]]; then
        ln -s ../passes graphopt/passes && LINKED_PASSES=1
        echo "graphopt.passes: linked graphopt/passes -> ../passes for this run"
    fi
}
setup_packages >"$LOGS/setup.log" 2>&1
cat "$LOGS/setup.log"

cat >"$LOGS/env_probe.py" <<'EOF'
import importlib, json, os, platform, subprocess, sys
info = {"date_utc": subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip(),
        "python": platform.python_version(), "graphopt revision": os.environ.get("GRAPHOPT_REVISION", "unknown")}
import torch
info["torch"] = torch.__version__
info["cuda"] = torch.version.cuda
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
    info["gpu memory GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
    info["driver"] = smi.stdout.strip() or "unknown"
else:
    info["gpu"] = "none"
for name in ("triton", "transformers", "liger_kernel", "flash_attn", "hypothesis"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "present")
    except Exception as e:  # absent, or broken: both worth knowing
        info[name] = "absent" if isinstance(e, ImportError) else f"broken ({type(e).__name__})"
import graphopt, graphopt.passes
info["graphopt from"] = os.path.relpath(os.path.dirname(graphopt.__file__))
info["graphopt.passes from"] = os.path.relpath(graphopt.passes.__path__[0])
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
# The revision: git's, else $GRAPHOPT_REVISION (set it where the copy has no .git), else unknown.
if revision=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || revision="$revision+dirty"
    export GRAPHOPT_REVISION=$revision
fi

# ---- the steps -------------------------------------------------------------------------------
# shellcheck disable=SC2086  # the size variables are word lists on purpose
{
    run_step env env 60 "$PY" "$LOGS/env_probe.py" "$LOGS/env.json"
    run_step op-varlen varlen 90 "$PY" examples/bench_varlen_attention.py --device "$DEVICE" --dtype "$DTYPE" \
        $VARLEN_SIZES --json "$LOGS/op-varlen.json"
    run_step op-lce lce 120 "$PY" examples/bench_linear_cross_entropy.py --device "$DEVICE" --dtype "$DTYPE" \
        $LCE_SIZES --json "$LOGS/op-lce.json"
    for selection in "${PYTEST_SELECTIONS[@]}"; do
        name=${selection%%|*}
        run_step "$name" pytest 180 "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra --junitxml="$LOGS/$name.xml" ${selection#*|}
    done
    run_step explain explain 60 "$PY" -m graphopt explain --device "$DEVICE" --dtype "$DTYPE" --family llama --layout right --seq 64
    run_step bench-packed bench 120 "$PY" -m graphopt.bench --config packed --device "$DEVICE" --dtype "$DTYPE" \
        $PACKED_SIZES $BENCH_STEPS --json "$LOGS/bench-packed.json"
    run_step bench-padded bench 150 "$PY" -m graphopt.bench --config padded --device "$DEVICE" --dtype "$DTYPE" \
        $PADDED_SIZES $BENCH_STEPS $PADDED_GUARD --json "$LOGS/bench-padded.json"
    run_step bench-loss bench 150 "$PY" -m graphopt.bench --config loss --device "$DEVICE" --dtype "$DTYPE" \
        $LOSS_SIZES $BENCH_STEPS --json "$LOGS/bench-loss.json"
}

publish
echo
cat "$LOGS/summary.md"
echo
echo "[gpu_check] $(($(date +%s) - START)) s in all; results in ${DEST#"$ROOT"/}/gpu_check.tar.gz and gpu_check_summary.md"
awk -F '\t' '$3 == "fail" || $3 == "timeout" { bad = 1 } END { exit bad }' "$LOGS/steps.tsv"

#!/usr/bin/env bash
# One prepared GPU check of care, sized for one NVIDIA H200 in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh --prepare            # here, once: wheels the GPU image lacks → .whl/
#   bash benchmarks/gpu_check.sh                      # on the GPU machine (the device tool's `run`,
#                                                     # carry [".whl"]); results in $OUT
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh    # the same parts, tiny, on the CPU (.venv)
#
# Parts, each under its own time limit (and all under GPU_CHECK_BUDGET_S, default 450 s); a part
# that fails or times out is recorded as FAILED with its last error line and the next one runs:
#   setup        the image's python3 (it holds the CUDA build of torch; nothing can be installed
#                from a registry there), the carried wheels (omegaconf, tensorboardX) installed
#                into a --target folder, care itself from src/ via PYTHONPATH (what `pip install
#                -e .` would give); checks that torch sees the GPU and that care imports
#   tests        the test files that hold CUDA-only tests (grep cuda.is_available), by file
#   throughput   benchmarks/throughput.py, ResNet-18 and ResNet-50 (widths 64-128-256-512, the
#                paper's CIFAR models) on random 3×32 images, bf16-mixed + channels_last, batch 256:
#                simclr, care separate views, care shared views
#   gpu_step     benchmarks/gpu_step.py: host syncs per step (sync debug mode) and peak memory of
#                a real Trainer step per method and backbone, one backward vs early_backward
#   pretrain     `care pretrain` method=care precision=auto, 2 epochs on a CIFAR-10-format folder
#                of 8000 tinted images that gpu_step.py writes; then `care probe` on the run
#   report       ONE markdown table: printed last, and $OUT/gpu_check.md
#
# $OUT gets at most 7 files (the device tool brings back 8): gpu_check.md, gpu_check.json (every
# part's status, the tests' summary, the rows), gpu_check.log (everything printed),
# throughput_resnet18.json, throughput_resnet50.json, gpu_step.json, pretrain.json (the run's
# summary.json and the probe-<settings>.json that care probe wrote). Per-part logs stay in the
# work folder (GPU_CHECK_WORK, default a fresh folder under /tmp). Exit status: 0 when every part
# passed, 1 otherwise (the table is written either way).
#
# Environment: OUT (default runs/gpu_check), PYTHON (default python3; .venv/bin/python when
# GPU_CHECK_SMOKE=1), GPU_CHECK_WORK, GPU_CHECK_BUDGET_S, GPU_CHECK_WHEELS (default .whl).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}

if [[ "${1:-}" == "--prepare" ]]; then
    # Pure-Python wheels of the dependencies the GPU image lacks, in the versions this checkout's
    # .venv runs (the image's python3 is 3.12; these wheels fit any Python 3).
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    mkdir -p "$WHEELS"
    if [[ "$WHEELS" == "$ROOT/.whl" && -d .git ]]; then # keep .whl/ out of git status
        mkdir -p .git/info
        grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    fi
    specs=()
    for dist in omegaconf tensorboardX; do
        version=$("$PY" -c "from importlib.metadata import version; print(version('$dist'))") || exit 1
        specs+=("$dist==$version")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d "$WHEELS" "${specs[@]}" || exit 1
    ls -l "$WHEELS"
    echo "carry .whl with the run: run(command='bash benchmarks/gpu_check.sh', carry=['.whl'])"
    exit 0
fi

SMOKE=${GPU_CHECK_SMOKE:-0}
OUT=${OUT:-$ROOT/runs/gpu_check}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=15 # seconds kept for the report
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SITE="$WORK/site"
mkdir -p "$OUT" "$WORK/logs"
rm -f "$WORK/parts.tsv" "$WORK/tests.xml" "$WORK/env.json" "$OUT"/gpu_check.{md,json} \
    "$OUT"/{throughput_resnet18,throughput_resnet50,gpu_step,pretrain}.json # no stale results
if [[ "$SMOKE" == 1 ]]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
else
    PY=${PYTHON:-python3}
fi
export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# run_part NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, what the budget has left),
# its output to the console and to $WORK/logs/NAME.log; one line in $WORK/parts.tsv.
run_part() {
    local name=$1 limit=$2 left t0 rc
    shift 2
    left=$((DEADLINE - RESERVE - $(date +%s)))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        echo "== $name: skipped, the time budget is spent"
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$WORK/parts.tsv"
        return 1
    fi
    echo "== $name (limit ${limit} s): $*"
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((($(date +%s%N) - t0) / 1000000)) "$limit" \
        >>"$WORK/parts.tsv"
    echo "== $name: exit $rc"
    return "$rc"
}

skip_part() { # NAME REASON
    echo "== $1: skipped, $2"
    printf '%s\tskipped:%s\t0\t0\n' "$1" "$2" >>"$WORK/parts.tsv"
}

setup() {
    if [[ "$SMOKE" != 1 ]]; then
        nvidia-smi || true
        if compgen -G "$WHEELS/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "$WHEELS"/*.whl || return 1
        else
            echo "no wheels in $WHEELS: if omegaconf is missing below, run" \
                "'bash benchmarks/gpu_check.sh --prepare' on the CPU machine and carry .whl"
        fi
        "$PY" benchmarks/gpu_step.py env --json "$WORK/env.json" --imports --require-cuda
    else
        "$PY" benchmarks/gpu_step.py env --json "$WORK/env.json"
    fi
}

main() {
    echo "gpu_check: smoke=$SMOKE python=$PY out=$OUT work=$WORK budget=${BUDGET}s"
    local model data tp_common step_common pretrain_extra probe_extra test_filter
    if [[ "$SMOKE" == 1 ]]; then
        model=("widths=[4,4,8,8]" head_hidden=16 head_out=8 group_size=8)
        tp_common=(--synthetic 3x16 "${model[@]}" batch_size=16 precision=32
            memory_format=contiguous steps=1 warmup=1)
        step_common=(--synthetic 3x16 --warmup 1 --measure 1 "${model[@]}" batch_size=16
            accelerator=cpu precision=32 memory_format=contiguous)
        data=(--train 160 --test 64)
        pretrain_extra=("${model[@]}" batch_size=32 precision=32 memory_format=contiguous
            accelerator=cpu knn_k=10 log_every=2)
        probe_extra=(probe_epochs=1 probe_seeds=1 knn_k=10)
        test_filter=(-k cuda)
    else
        model=("widths=[64,128,256,512]")
        tp_common=(--synthetic 3x32 "${model[@]}" batch_size=256 precision=bf16-mixed
            memory_format=channels_last steps=10 warmup=3)
        step_common=(--synthetic 3x32 --warmup 3 --measure 3 "${model[@]}" batch_size=256
            accelerator=gpu precision=bf16-mixed memory_format=channels_last)
        data=(--train 8000 --test 2000)
        pretrain_extra=("${model[@]}" batch_size=256 precision=auto log_every=10)
        probe_extra=(probe_epochs=10 probe_seeds=1)
        test_filter=()
    fi
    local variants=simclr,care-separate,care-shared

    run_part setup 45 bash -c setup
    local setup_ok=$?

    grep -rlE --include='*.py' 'cuda\.is_available' tests | sort >"$WORK/test_files.txt"
    mapfile -t test_files <"$WORK/test_files.txt"
    if ((${#test_files[@]} == 0)); then
        skip_part tests "no test file in tests/ checks cuda.is_available"
    else
        run_part tests 60 "$PY" -m pytest -q -rs -p no:cacheprovider \
            --junitxml="$WORK/tests.xml" "${test_filter[@]}" "${test_files[@]}"
    fi

    for backbone in resnet18 resnet50; do
        local limit=75
        [[ $backbone == resnet50 ]] && limit=100
        run_part "throughput_$backbone" "$limit" "$PY" benchmarks/throughput.py \
            --variants "$variants" --json "$OUT/throughput_$backbone.json" \
            "${tp_common[@]}" "backbone=$backbone"
    done

    run_part gpu_step 100 "$PY" benchmarks/gpu_step.py step --json "$OUT/gpu_step.json" \
        --backbones resnet18,resnet50 --variants "$variants" "${step_common[@]}"

    rm -rf "$WORK/run" "$WORK/cifar10"
    if ! run_part data 30 "$PY" benchmarks/gpu_step.py cifar "$WORK/cifar10" "${data[@]}"; then
        skip_part pretrain "no CIFAR-10 folder"
        skip_part probe "no CIFAR-10 folder"
    elif run_part pretrain 100 "$PY" -m care pretrain dataset=cifar10 data_root="$WORK/cifar10" \
        out="$WORK/run" method=care epochs=2 "${pretrain_extra[@]}"; then
        run_part probe 45 "$PY" -m care probe "$WORK/run" "${probe_extra[@]}"
    else
        skip_part probe "the pretraining failed"
    fi
    ((setup_ok == 0)) || echo "== setup failed: the parts after it may fail for that reason"

    echo
    local smoke_flag=()
    [[ "$SMOKE" == 1 ]] && smoke_flag=(--smoke)
    echo "== report (total $(($(date +%s) - START)) s)"
    "$PY" benchmarks/gpu_step.py report --out "$OUT" --work "$WORK" "${smoke_flag[@]}"
}

export -f setup
export SMOKE WHEELS PY SITE WORK

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

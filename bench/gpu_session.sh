#!/usr/bin/env bash
# The GPU work still open on issues 15-18, on one H200, in parts that each fit one 10-minute device call:
#
#   bench/gpu_session.sh PART [PART ...]
#
# Each part's outputs go to one archive, $OUT/PART.tar.gz (the device tool returns at most 8 files), written even
# when a command of the part fails or hits its time limit (every command runs under `timeout`). The wheels the GPU
# image lacks are installed first from the carried .whl/ (../shared/tools/device-wheels.sh), then this checkout.
# Parts, in the order of what they settle:
#
#   issue15  `embscale bench --sections fsdp,moe` (FSDP2 on a one-rank mesh against the plain step; the MoE layer
#            with the gather-sum kernel) and `python -m embscale.bench.memory_check` (the plan's estimate against
#            measured peaks on six paper_280m points)                                          about 8 min
#   decode   bench/decode_gpu.sh: the NE/MoE pair with the warm-up, eager, compiled, the LongCat slice    about 7 min
#   packed   fig2_small on the system corpus with warm workers, 1w and 3w (start-up, end to end)      about 8 min
#   tests    the whole suite (python -m pytest -n 8)                                                 about 5 min
#   control  the reproduction's control sweep (carry .repro) and tests/test_deterministic_cuda.py    about 5 min
#
# A device call: carry [".whl"] (and ".repro" for control), timeout_s 600, command
#   OUT=$OUT bench/gpu_session.sh issue15
# memory_check stops at its budget with the points left listed; to go on in another call, put the returned
# issue15/memory/memory_check.json into .gpu_session/ (ignored: add it to .git/info/exclude) and carry that too.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$out"
export EMBSCALE_PROGRESS=plain PYTHONUNBUFFERED=1

setup() {
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.whl
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1 || true
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        >> "$work/gpu.txt" 2>&1
}

step() {  # step SECONDS NAME COMMAND...: run it, its output to $part_dir/NAME.log, its exit code recorded
    local seconds="$1" name="$2"; shift 2
    local started=$SECONDS
    echo "== $name: $*" | tee -a "$part_dir/steps.txt"
    timeout --kill-after=20 "$seconds" "$@" > "$part_dir/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code after $((SECONDS - started)) s" | tee -a "$part_dir/steps.txt"
    tail -n 25 "$part_dir/$name.log"
}

work=$(mktemp -d /tmp/gpu-session.XXXXXX)
setup
for part in "$@"; do
    part_dir="$work/$part"
    mkdir -p "$part_dir"
    cp "$work/gpu.txt" "$part_dir/"
    case "$part" in
        issue15)
            step 200 bench python3 -m embscale bench --sections fsdp,moe --out "$part_dir/bench.md" \
                --json "$part_dir/bench.json"
            if [ -f .gpu_session/memory_check.json ]; then  # an earlier call's points: measured ones are skipped
                mkdir -p "$part_dir/memory" && cp .gpu_session/memory_check.json "$part_dir/memory/"
            fi
            step 330 memory python3 -m embscale.bench.memory_check --out "$part_dir/memory" --budget-s 300
            ;;
        decode)
            step 540 decode bash bench/decode_gpu.sh "$part_dir/decode"
            ;;
        packed)
            step 120 prepare python3 -m embscale.bench.packed --prepare-only --work /tmp/packed --corpus system
            step 420 packed python3 -m embscale.bench.packed --work /tmp/packed --corpus system --k 1w,3w \
                --deadline-s 400 --out "$part_dir/packed"
            ;;
        tests)
            step 540 pytest python3 -m pytest -q -p no:cacheprovider -n 8 --dist loadfile -x
            ;;
        control)
            step 360 reproduce python3 -m embscale.bench.reproduce --out "$part_dir/reproduce" --budget-s 300 \
                --restore .repro/results.tar.gz
            step 150 deterministic python3 -m pytest -q -p no:cacheprovider tests/test_deterministic_cuda.py
            ;;
        *)
            echo "unknown part $part (issue15, decode, packed, tests, control)" | tee -a "$part_dir/steps.txt"
            ;;
    esac
    tar -czf "$out/$part.tar.gz" -C "$work" "$part"
    echo "== $part: $out/$part.tar.gz"
done

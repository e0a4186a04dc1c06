#!/usr/bin/env bash
# The decode benchmark of issue 16 on one GPU (an H200 in mind), in one command:
#   bench/decode_gpu.sh [OUT]        (OUT defaults to $OUT, else results/decode_bench)
# 1. the benchmark pair, NE against MoE (bench_ne_100m / bench_moe_100m: equal totals, 422.9M), batch 1..256,
#    plain and speculative (k = 4, the draft is each model's own trunk on its plain token embedding), the decode
#    step replayed from a CUDA graph;
# 2. the same pair with the eager step at three batch sizes (what the CUDA graph buys);
# 3. the pair with the graphed step compiled by torch.compile first (--compile) at two batch sizes: what fusing
#    the step's small operations takes off the graph's fixed cost (compiling is untimed, about a minute a shape);
# 4. the one-layer LongCat-Flash-Lite slice (models/configs/longcat_flash_lite_slice.yaml, 34.8B parameters,
#    about 70 GB in bfloat16).
# The pair's graphed runs also profile 20 decode steps at batch 64 (each kernel's device time inside the graph, in
# the JSON and the table). Each writes decode_bench.json, decode_experts.{png,pdf}, decode_throughput.{png,pdf}
# and the printed table (table.txt) under OUT/<name>/. Weights are random: speeds, expert counts and floors are those of the shapes;
# the acceptance rates of random weights mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-results/decode_bench}}"
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
common=(--device cuda --dtype bfloat16 --prompt-len 128 --new-tokens 64 --k 4)
export EMBSCALE_PROGRESS="${EMBSCALE_PROGRESS:-plain}"

run() {  # run NAME ARGS...: one decode-bench into OUT/NAME, its table kept beside the JSON
    local name="$1"; shift
    mkdir -p "$out/$name"
    # the common settings first: a run's own (--k 0, --batch-sizes) come later and win
    "$python" -m embscale decode-bench "${common[@]}" "$@" --out "$out/$name" | tee "$out/$name/table.txt"
}

mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$out/gpu.txt" 2>&1 || true
run bench_pair bench_ne_100m bench_moe_100m --profile-batch 64
run bench_pair_eager bench_ne_100m bench_moe_100m --batch-sizes 1,8,64 --k 0 --no-cuda-graph
run bench_pair_compiled bench_ne_100m bench_moe_100m --batch-sizes 1,64 --k 0 --compile --profile-batch 64
run longcat_slice longcat_flash_lite_slice

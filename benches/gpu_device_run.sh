#!/usr/bin/env bash
# One call on a lent GPU machine (see gpu_bench.py): versions, the benchmark, and the GPU tests.
#   bash benches/gpu_device_run.sh OUTDIR [KERNELS] [PYTEST_K]
# KERNELS: gpu_bench.py sections, each run on its own with its own time limit and JSON (default search,decode:
# the shorter first, so that a long decode sweep cannot cost the search figures); PYTEST_K: a pytest -k
# filter ("" = all GPU tests, "none" = no tests). BENCH_S (default 300): seconds for each section. A device
# call may run 600 s: time the sections in one call (PYTEST_K=none) and run the tests in another
# (KERNELS="").
set -o pipefail
out=${1:-/tmp/gpu-run}
kernels=${2:-search,decode}
filter=${3:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton, triton.language as tl; print('torch', torch.__version__, 'triton', triton.__version__, 'tl.topk', hasattr(tl, 'topk'))"
for section in ${kernels//,/ }; do
    timeout "${BENCH_S:-300}" python3 benches/gpu_bench.py --kernels "$section" --json "$out/gpu_bench_$section.json" 2>&1 \
        | tee "$out/bench_$section.log" | grep -v '^decode\|^search\|^index\|^stage-1'
    echo "bench $section exit $?"
done
if [ -n "$NCU" ]; then  # Nsight Compute on the decode kernel's configurations (benches/gpu_ncu_decode.py)
    ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    timeout 150 "$ncu_bin" --clock-control none --kernel-name regex:_kivi_decode --launch-skip 0 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum,dram__bytes_read.sum \
        python3 benches/gpu_ncu_decode.py $NCU \
        > "$out/ncu.txt" 2>&1
    echo "ncu exit $?"
    grep -E "ran |Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Compute \(SM\) Throughput|bank_conflicts|wavefronts|inst_executed|dram__bytes" "$out/ncu.txt" | head -90
fi
if [ "$filter" != none ]; then
    timeout 160 python3 -m pytest -q -x -p no:cacheprovider -n 8 -m "gpu and not slow" ${filter:+-k "$filter"} \
        tests/test_gpu_kernels.py tests/test_gpu_kv_cache.py 2>&1 | tee "$out/pytest.log" | tail -15
    echo "pytest exit $?"
fi

#!/usr/bin/env bash
# Branch moh-device-routing in one GPU call: build; the MoE/router/training
# tests (the device top-k mask, MoH routed on the device); the flash parity
# tests with the 4-warp fused dK dV kernel; racecheck on both fused kernels; the fused backward's
# three forms (8 warps; 8b: 8 warps with main's end barrier; 4 warps) timed alternately at 32K
# (twice each) and the fastest kept for the rest:
# memcheck, the mixer bench (gate / MoH overhead), attention at 16K (the
# 'flash moh rows' packing row) and 128K (S2 against dense cuDNN) beside
# PyTorch SDPA, then ncu with warp stall reasons on the fused dK dV kernel.
# Logs under $OUT (default /tmp/o).
set -u; O=${OUT:-/tmp/o}; mkdir -p $O; B=build-gpu; T0=$SECONDS
el() { echo "+$((SECONDS - T0))s"; }
cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > $O/configure.log 2>&1 || { tail -20 $O/configure.log; exit 1; }
cmake --build $B -j16 --target loom_cuda_tests loom-bench > $O/build.log 2>&1 || { grep -B2 -A8 error $O/build.log | head -60; exit 1; }
echo "built $(el)"; nvidia-smi -L
bash tools/sass_spills.sh $B/kernels/CMakeFiles/loom_kernels.dir/cuda/flash_attention.cu.o dkdv 2>&1 | head
timeout 120 $B/loom_cuda_tests --gtest_filter='CudaMoe*:CudaRouter*:Models/CudaTraining*' > $O/tests.log 2>&1; echo "tests rc $? $(el)"
grep -E "^\[ +(OK|FAILED|PASSED) " $O/tests.log; grep -B3 -A8 Failure $O/tests.log | head -30
LOOM_FLASH_BWD_WARPS=4 timeout 150 $B/loom_cuda_tests --gtest_filter='CudaFlashAttention*' > $O/flash4.log 2>&1; echo "flash (4 warps) rc $? $(el)"
grep -E "^\[ +(OK|FAILED|PASSED) " $O/flash4.log; grep -B3 -A8 Failure $O/flash4.log | head -30
for w in 8 4; do  # shared-memory hazards of both fused kernels (the 8-warp one has one barrier less per tile)
  LOOM_FLASH_BWD_WARPS=$w timeout 120 compute-sanitizer --tool racecheck --error-exitcode 9 $B/loom_cuda_tests \
    --gtest_filter='CudaFlashAttention.BackwardIsDeterministic' > $O/racecheck-$w.log 2>&1
  echo "racecheck ($w warps) rc $? $(el)"; grep -E "RACECHECK SUMMARY|ERROR SUMMARY" $O/racecheck-$w.log | head -2
done
for pass in 1 2; do for w in 8 8b 4; do
  LOOM_FLASH_BWD_WARPS=$w $B/loom-bench --families attention --seq 32768 --reps 10 --json $O/b32-$w-$pass.json \
    > /dev/null 2>&1
  python3 -c "
import json; d={r['name']:r['ms'] for r in json.load(open('$O/b32-$w-$pass.json'))['rows']}
print('form $w pass $pass', {k: round(v,3) for k,v in d.items() if 'fwd+bwd' in k})"
done; done
echo "A/B $(el)"
W=$(python3 -c "
import json
def f(w): return min(r['ms'] for p in (1, 2) for r in json.load(open('$O/b32-%s-%d.json' % (w, p)))['rows']
                     if r['name'] == 'flash fwd+bwd')
print(min(['8', '8b', '4'], key=f))"); echo "fastest (best of two passes): $W"; export LOOM_FLASH_BWD_WARPS=$W
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 $B/loom_cuda_tests --gtest_filter='CudaMoe.TopkMask*:CudaFlashAttention.BackwardIsDeterministic:CudaFlashAttention.Dispatch*' > $O/memcheck.log 2>&1
echo "memcheck rc $? $(el)"; grep "ERROR SUMMARY" $O/memcheck.log
$B/loom-bench --families mixer --reps 10 > $O/mixer.log 2>&1; echo "mixer rc $? $(el)"; grep -A6 "== mixer" $O/mixer.log
$B/loom-bench --families attention --seq 16384 --reps 10 --json $O/b16.json > $O/b16.log 2>&1; echo "b16 rc $?"
python3 tools/bench_torch.py --reps 10 $O/b16.json > $O/t16.log 2>&1; echo "t16 rc $? $(el)"; grep -A14 "== attention" $O/t16.log
$B/loom-bench --families attention --seq 131072 --reps 5 --json $O/b128.json > $O/b128.log 2>&1; echo "b128 rc $?"
python3 tools/bench_torch.py --reps 5 $O/b128.json > $O/t128.log 2>&1; echo "t128 rc $? $(el)"; grep -A10 "== attention" $O/t128.log
timeout 90 ncu --clock-control none -k regex:flash_backward_dkdv --launch-skip 2 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
  $B/loom-bench --families attention --seq 16384 --reps 3 > $O/ncu.txt 2>&1; echo "ncu rc $? $(el)"
grep -E "dkdv|Duration|Issue Slots|stalled" $O/ncu.txt | head -40

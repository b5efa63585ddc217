#!/usr/bin/env bash
# Branch moh-router-wide in one GPU call (~6 min): build; the router, MoE,
# reduction, element-wise, tensor, autograd, cuDNN and training tests (the
# routers' bf16 product with f32 output, the moh_gate kernels, the
# warp-per-output partial sums, the deterministic-cuDNN message); the mixer
# bench (MoH over plain, same call) and an ncu breakdown of the MoH variant;
# the flash parity tests with the rolled fused dK dV kernel
# (LOOM_FLASH_BWD_ROLL=1) and its A/B against the unrolled one at 32K
# (alternated twice). Merge if the tests pass and MoH's kernels got cheaper;
# keep the rolled loops only if they win (then drop the switch).
# Logs under $OUT (default /tmp/o).
set -u; O=${OUT:-/tmp/o}; mkdir -p $O; B=build-gpu; T0=$SECONDS
cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > $O/configure.log 2>&1 || { tail -20 $O/configure.log; exit 1; }
cmake --build $B -j16 --target loom_cuda_tests loom-bench > $O/build.log 2>&1 || { grep -B2 -A8 error $O/build.log | head -60; exit 1; }
echo "built +$((SECONDS - T0))s"; nvidia-smi -L
timeout 150 $B/loom_cuda_tests \
  --gtest_filter='CudaRouter*:CudaMoe*:CudaReduce*:CudaElementwise*:CudaTensor*:CudaAutograd*:CudaCudnn*:Models/CudaTraining*' \
  > $O/cuda_tests.log 2>&1; echo "cuda tests rc $? +$((SECONDS - T0))s"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \] [A-Z]" $O/cuda_tests.log | sort | uniq | head; grep -B3 -A10 Failure $O/cuda_tests.log | head -30
$B/loom-bench --families mixer --reps 10 > $O/mixer.log 2>&1; echo "mixer rc $?"; grep -A6 "== mixer" $O/mixer.log
timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip 40 --launch-count 400 \
  $B/loom-bench --families mixer --reps 10 --rows moh > $O/mix-moh.csv 2>&1; echo "ncu rc $?"
python3 tools/kernel_breakdown.py $O/mix-moh.csv | head -24; echo "profile +$((SECONDS - T0))s"
LOOM_FLASH_BWD_ROLL=1 timeout 100 $B/loom_cuda_tests --gtest_filter='CudaFlashAttention*' > $O/flash-roll.log 2>&1
echo "flash (rolled) rc $?"; grep -E "^\[  (PASSED|FAILED) " $O/flash-roll.log; grep -B3 -A8 Failure $O/flash-roll.log | head -20
for pass in 1 2; do for r in 0 1; do
  LOOM_FLASH_BWD_ROLL=$r $B/loom-bench --families attention --seq 32768 --reps 10 --rows "flash fwd+bwd" > $O/roll-$r-$pass.log 2>&1
  echo "roll $r pass $pass: $(grep -E '^flash fwd\+bwd' $O/roll-$r-$pass.log)"
done; done
echo "done +$((SECONDS - T0))s"

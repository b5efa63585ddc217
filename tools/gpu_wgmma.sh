#!/usr/bin/env bash
# Branch wgmma-bwd in one GPU call (~7 min): build; the warpgroup product check
# (CudaWgmma: tile layout, descriptors, fragments); the flash parity tests (the
# wgmma forward and dK dV kernels and the mma.sync ones, LOOM_FLASH_WGMMA=0);
# the same-run A/B of the flash rows at 32K (alternated twice); racecheck on
# the wgmma kernels; the attention table beside SDPA at 32K; memcheck; then
# moh-router-wide's tests and the mixer bench (most important first).
# Logs under $OUT (default /tmp/o).
set -u; O=${OUT:-/tmp/o}; mkdir -p $O; B=build-gpu; T0=$SECONDS
el() { echo "+$((SECONDS - T0))s"; }
sanitize() {  # compute-sanitizer tool $1: the wgmma forward and dK dV kernels, the deterministic pair
  timeout 90 compute-sanitizer --tool $1 --error-exitcode 9 $B/loom_cuda_tests \
    --gtest_filter='CudaFlashAttention.BackwardIsDeterministic' > $O/$1.log 2>&1
  echo "$1 rc $? $(el)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" $O/$1.log | head -3
}
cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > $O/configure.log 2>&1 || { tail -20 $O/configure.log; exit 1; }
cmake --build $B -j16 --target loom_cuda_tests loom-bench > $O/build.log 2>&1 || { grep -B2 -A8 error $O/build.log | head -60; exit 1; }
echo "built $(el)"; nvidia-smi -L
timeout 60 $B/loom_cuda_tests --gtest_filter='CudaWgmma*' > $O/wgmma.log 2>&1; echo "wgmma check rc $? $(el)"
grep -E "^\[ +(OK|FAILED|PASSED|SKIPPED) |Failure|c\[" $O/wgmma.log | head -24
if ! grep -q "^\[  PASSED  \] 1 test" $O/wgmma.log; then
  # The likeliest fault is the MN-major descriptor's LBO/SBO roles: try them swapped and keep the
  # swap for the rest of the run if the check then passes (the log says which encoding ran).
  cp kernels/cuda/wgmma.cuh /tmp/wgmma.cuh.orig
  sed -i 's/static_cast<uint32_t>(rows) \* 128, 1024)/1024, static_cast<uint32_t>(rows) * 128)/' kernels/cuda/wgmma.cuh
  grep -n "descriptor(tile + p" kernels/cuda/wgmma.cuh
  cmake --build $B -j16 --target loom_cuda_tests loom-bench > $O/build-swap.log 2>&1 || { grep -B2 -A8 error $O/build-swap.log | head; exit 1; }
  timeout 60 $B/loom_cuda_tests --gtest_filter='CudaWgmma*' > $O/wgmma-swap.log 2>&1; echo "wgmma check, MN-major LBO/SBO swapped: rc $? $(el)"
  grep -E "^\[ +(OK|FAILED|PASSED|SKIPPED) |Failure|c\[" $O/wgmma-swap.log | head -24
  grep -q "^\[  PASSED  \] 1 test" $O/wgmma-swap.log || cp /tmp/wgmma.cuh.orig kernels/cuda/wgmma.cuh
fi
timeout 200 $B/loom_cuda_tests --gtest_filter='CudaFlashAttention*' > $O/flash-wgmma.log 2>&1
echo "flash (both families) rc $? $(el)"; grep -E "^\[ +(OK|FAILED|PASSED) " $O/flash-wgmma.log; grep -B3 -A8 Failure $O/flash-wgmma.log | head -40
for pass in 1 2; do for w in 0 1; do
  LOOM_FLASH_WGMMA=$w $B/loom-bench --families attention --seq 32768 --reps 10 --rows "flash" > $O/ab-$w-$pass.log 2>&1
  echo "wgmma $w pass $pass:"; grep -E "^flash" $O/ab-$w-$pass.log
done; done
echo "a/b $(el)"
sanitize racecheck
timeout 120 $B/loom-bench --families attention --seq 32768 --reps 10 --json $O/bench.json > $O/bench.log 2>&1
timeout 150 python3 tools/bench_torch.py --reps 10 $O/bench.json > $O/torch.log 2>&1
echo "table rc $? $(el)"; grep -A14 "== attention" $O/torch.log
sanitize memcheck
timeout 150 $B/loom_cuda_tests \
  --gtest_filter='CudaSigmoidGate*:CudaSwiglu*:CudaKernels*:CudaRouter*:CudaMoe*:CudaReduce*:CudaElementwise*:CudaTensor*:CudaAutograd*:CudaCudnn*:Models/CudaTraining*' \
  > $O/cuda_tests.log 2>&1; echo "cuda tests rc $? $(el)"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \] [A-Z]" $O/cuda_tests.log | sort | uniq | head; grep -B3 -A10 Failure $O/cuda_tests.log | head -30
timeout 60 $B/loom-bench --families mixer --reps 10 > $O/mixer.log 2>&1; echo "mixer rc $? $(el)"; grep -A6 "== mixer" $O/mixer.log
echo "done $(el)"

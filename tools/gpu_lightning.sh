#!/usr/bin/env bash
# The lightning kernels in one GPU call: build, the lightning parity tests and
# the bf16 training tests, compute-sanitizer memcheck and racecheck on the small
# odd-head-dim cases (both load paths: cp.async rows and element loads),
# loom-bench-lightning, and an ncu pass over every lightning launch of one
# forward and one forward + backward at each T of NCU_T (default 65536). Logs go to $OUT (or
# ./gpu-out), at most 7 files (8 with two NCU_T). Parts after the bench are skipped once the call
# has run LIMIT seconds (default 400). FLASH_NCU=1 adds an ncu pass over the
# flash backward kernels at T = 16K.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; B=build-gpu; LIMIT=${LIMIT:-400}; T0=$SECONDS
el() { echo "+$((SECONDS - T0))s"; }
targets=(loom_cuda_tests loom-bench-lightning); [ -n "${FLASH_NCU:-}" ] && targets+=(loom-bench)
{ cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
  cmake --build $B -j"$(nproc)" --target "${targets[@]}"; } > "$OUT/build.log" 2>&1 \
  || { grep -B2 -A8 -E "error|Error" "$OUT/build.log" | head -60; exit 1; }
echo "built $(el)"; nvidia-smi -L
grep -A2 "lightning_mma_kernel" "$OUT/build.log" | grep -E "registers|spill" | head -8
timeout 150 $B/loom_cuda_tests --gtest_filter='CudaLightning*:Models/CudaTraining*' > "$OUT/tests.log" 2>&1
echo "tests rc $? $(el)"; grep -E "^\[ +(OK|FAILED|PASSED) |/ bound" "$OUT/tests.log"
grep -B3 -A8 "Failure" "$OUT/tests.log" | head -60
timeout 120 $B/loom-bench-lightning --reps 10 > "$OUT/bench.log" 2>&1
echo "bench rc $? $(el)"; cat "$OUT/bench.log"
small='CudaLightning.MatchesTheCpuTwinOnBatchesMixedDecaysAndOddHeadDims'
if [ $((SECONDS - T0)) -lt "$LIMIT" ]; then
  for tool in ${SANITIZERS:-memcheck racecheck}; do
    timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 $B/loom_cuda_tests --gtest_filter="$small" \
      >> "$OUT/sanitizer.log" 2>&1
    echo "$tool rc $? $(el)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard" "$OUT/sanitizer.log" | tail -2
  done
fi
for t in ${NCU_T:-65536}; do
  [ $((SECONDS - T0)) -lt "$LIMIT" ] || break
  # One forward and one forward + backward at T = t (warm-up + 1 repetition each): every lightning launch
  # (chunk passes and scans), 20 in all.
  timeout 150 ncu --clock-control none -k regex:lightning --launch-count 20 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis $B/loom-bench-lightning --min-t "$t" \
    --max-t "$t" --reps 1 > "$OUT/ncu-lightning-$t.txt" 2>&1
  echo "ncu T $t rc $? $(el)"
  grep -E "lightning_(mma|scan)|  Duration|Compute \(SM\) Throughput|DRAM Throughput|Achieved Occupancy|Issue Slots Busy|pipeline \(" \
    "$OUT/ncu-lightning-$t.txt" | cut -c1-120 | head -120
done
if [ -n "${FLASH_NCU:-}" ] && [ $((SECONDS - T0)) -lt "$LIMIT" ]; then
  timeout 120 ncu --clock-control none -k regex:flash_backward --launch-skip 0 --launch-count 4 \
    --section SpeedOfLight --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis $B/loom-bench --families attention --seq 16384 --reps 10 > "$OUT/ncu-flash.txt" 2>&1
  echo "flash ncu rc $? $(el)"
fi
[ -f "$OUT/ncu-flash.txt" ] && grep -E "flash_backward|  Duration|Compute \(SM\) Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|pipeline \(|Spilling" \
  "$OUT/ncu-flash.txt" | cut -c1-140 | head -30

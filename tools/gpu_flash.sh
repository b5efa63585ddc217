#!/usr/bin/env bash
# The attention kernels in one GPU call: build, the flash and interim parity
# tests (and the bf16 router and training tests), the attention and mixer benchmarks beside
# PyTorch SDPA, compute-sanitizer on the small flash tests, and an ncu pass of
# the kernel NCU_K names (a regex; default the forward) at T = 16K, and where
# the flash kernels spill (tools/sass_spills.sh). LIGHTNING=1 also runs the lightning tests
# (plain and under memcheck) and loom-bench-lightning. Logs go to $OUT (or
# ./gpu-out). SEQ=T times the attention rows of that length only; memcheck,
# the mixer bench and ncu are skipped once the call has run LIMIT seconds
# (default 330), so a short device slot still returns the main results.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; B=build-gpu; LIMIT=${LIMIT:-330}; T0=$SECONDS
el() { echo "+$((SECONDS - T0))s"; }
cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build $B -j"$(nproc)" --target loom_cuda_tests loom-bench loom-bench-lightning > "$OUT/build.log" 2>&1 \
  || { grep -B2 -A8 -E "error|Error" "$OUT/build.log" | head -60; exit 1; }
echo "built $(el)"; nvidia-smi -L
bash tools/sass_spills.sh $B/kernels/CMakeFiles/loom_kernels.dir/cuda/flash_attention.cu.o flash_ 2>&1 | head -20
timeout 150 $B/loom_cuda_tests --gtest_filter='CudaFlashAttention*:CudaAttention*:CudaRouter*:CudaCudnn*' > "$OUT/flash.log" 2>&1
echo "attention tests rc $? $(el)"
grep -E "^\[ +(OK|FAILED|PASSED) " "$OUT/flash.log"; grep -B3 -A6 "Failure" "$OUT/flash.log" | head -40
timeout 150 $B/loom_cuda_tests --gtest_filter='Models/CudaTraining*' > "$OUT/training.log" 2>&1
echo "training tests rc $? $(el)"; grep -E "^\[ +(OK|FAILED|PASSED) " "$OUT/training.log"
grep -B3 -A6 "Failure" "$OUT/training.log" | head -30
if [ -n "${LIGHTNING:-}" ]; then
  timeout 120 $B/loom_cuda_tests --gtest_filter='CudaLightning*' > "$OUT/lightning.log" 2>&1
  echo "lightning tests rc $? $(el)"; grep -E "^\[ +(OK|FAILED|PASSED) " "$OUT/lightning.log"
  grep -B3 -A6 "Failure" "$OUT/lightning.log" | head -30
  timeout 90 $B/loom-bench-lightning --reps 10 > "$OUT/bench-lightning.log" 2>&1
  echo "lightning bench rc $? $(el)"; tail -12 "$OUT/bench-lightning.log"
fi
SEQARG=(); [ -n "${SEQ:-}" ] && SEQARG=(--seq "$SEQ")
timeout 180 $B/loom-bench --families attention --reps 10 "${SEQARG[@]}" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc $? $(el)"
timeout 200 python3 tools/bench_torch.py --reps 10 "$OUT/bench.json" > "$OUT/torch.log" 2>&1
echo "torch rc $? $(el)"; grep -A26 "== attention" "$OUT/torch.log"
if [ -n "${LIGHTNING:-}" ] && [ $((SECONDS - T0)) -lt "$LIMIT" ]; then
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 $B/loom_cuda_tests \
    --gtest_filter='CudaLightning.TwoChained*' > "$OUT/memcheck-lightning.log" 2>&1
  echo "lightning memcheck rc $? $(el)"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck-lightning.log" | head -3
fi
[ $((SECONDS - T0)) -lt "$LIMIT" ] && timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 $B/loom_cuda_tests \
  --gtest_filter='CudaFlashAttention.BackwardIsDeterministic:CudaFlashAttention.Dispatch*:CudaCudnnAttention.Backends*' > "$OUT/memcheck.log" 2>&1
echo "memcheck rc $? $(el)"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" | head -4
if [ $((SECONDS - T0)) -lt "$LIMIT" ]; then
  timeout 60 $B/loom-bench --families mixer --reps 10 > "$OUT/mixer.log" 2>&1
  echo "mixer rc $? $(el)"; grep -A6 "== mixer" "$OUT/mixer.log"
fi
if [ $((SECONDS - T0)) -lt "$LIMIT" ]; then
  timeout 90 ncu --clock-control none -k "regex:${NCU_K:-flash_forward_kernel}" --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
    --section SourceCounters --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    $B/loom-bench --families attention --seq 16384 --reps 10 > "$OUT/ncu.txt" 2>&1
  echo "ncu rc $? $(el)"
fi

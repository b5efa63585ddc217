#!/usr/bin/env bash
# Attention and mixer check in one GPU call (issue 7): build; every CUDA test
# (cuDNN's left out: run tools/gpu_flash.sh for those) and the CUDA placement
# tests of the tensor/nn suites; memcheck on the element-wise, reduction and
# copy kernels; the mixer bench and a per-kernel breakdown of its plain,
# headwise-gate and MoH variants (ncu; read with tools/kernel_breakdown.py);
# attention at 32K beside PyTorch SDPA; S2 against dense cuDNN at 128K.
# About 5 minutes on an H100. Logs under $OUT (default /tmp/o).
set -u; O=${OUT:-/tmp/o}; mkdir -p $O; B=build-gpu; T0=$SECONDS
el() { echo "+$((SECONDS - T0))s"; }
cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > $O/configure.log 2>&1 || { tail -20 $O/configure.log; exit 1; }
cmake --build $B -j16 --target loom_cuda_tests loom-bench loom_ops_tensor_tests loom_ops_nn_tests > $O/build.log 2>&1 \
  || { grep -B2 -A8 error $O/build.log | head -60; exit 1; }
echo "built $(el)"; nvidia-smi -L
summary() { grep -E "^\[  (PASSED|FAILED) |^\[  SKIPPED \] [0-9]|^\[  FAILED  \] [A-Z]" "$1" | sort | uniq | head -20; }
timeout 280 $B/loom_cuda_tests --gtest_filter='-CudaCudnn*' > $O/cuda_tests.log 2>&1; echo "cuda tests rc $? $(el)"
summary $O/cuda_tests.log; grep -B3 -A8 Failure $O/cuda_tests.log | head -40
for t in ops_tensor ops_nn; do
  timeout 60 $B/loom_${t}_tests --gtest_filter='*Cuda*:*cuda*' > $O/${t}.log 2>&1; echo "$t rc $?"; summary $O/${t}.log
done
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 $B/loom_cuda_tests \
  --gtest_filter='CudaElementwise.BinaryOps*:CudaReduce.SumDim*:CudaTensor.Dense*:CudaTensor.Strided*' > $O/memcheck.log 2>&1
echo "memcheck rc $? $(el)"; grep "ERROR SUMMARY" $O/memcheck.log
$B/loom-bench --families mixer --reps 10 > $O/mixer.log 2>&1; echo "mixer rc $? $(el)"; grep -A6 "== mixer" $O/mixer.log
for v in plain headwise moh; do
  timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip 40 --launch-count 400 \
    $B/loom-bench --families mixer --reps 10 --rows "$v" > $O/mix-$v.csv 2>&1; echo "ncu $v rc $?"
  python3 tools/kernel_breakdown.py $O/mix-$v.csv | head -12
done
echo "profiles $(el)"
$B/loom-bench --families attention --seq 32768 --reps 10 --json $O/b32.json > $O/b32.log 2>&1; echo "b32 rc $?"
python3 tools/bench_torch.py --reps 10 $O/b32.json > $O/t32.log 2>&1; echo "t32 rc $? $(el)"; grep -A14 "== attention" $O/t32.log
for r in "flash s2" cudnn; do
  $B/loom-bench --families attention --seq 131072 --reps 10 --rows "$r" > $O/b128-${r// /_}.log 2>&1; echo "b128 $r rc $?"
  grep -E "fwd" $O/b128-${r// /_}.log
done
echo "done $(el)"

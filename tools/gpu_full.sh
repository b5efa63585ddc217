#!/usr/bin/env bash
# The whole CUDA check in one GPU call (~9 min), most important first: build;
# the warpgroup product check and the flash parity tests (both kernel
# families); with AB="NAME[=v1,v2] ...", a same-run A/B of each environment
# switch (its values, 0,1 by default, alternated twice on the 32K flash rows);
# racecheck on the warpgroup flash kernels; the attention table beside SDPA
# at 32K; S2 against dense cuDNN at 128K; the mixer; memcheck; the CUDA
# parallel tests on one rank; every other CUDA test. NCU=1 adds an ncu pass
# of the warpgroup forward and dK dV kernels (stall reasons) before the last.
# SASS=1 adds the warpgroup kernels' machine code (tools/sass_summary.py: size,
# loops, opcodes; flash_sm90.sass.gz) and ncu's stall samples per instruction.
# NCU_SEQ and NCU_ROWS pick the bench row both profile (default 16384, "flash fwd+bwd";
# e.g. 131072, "flash s2 fwd+bwd").
# QUICK=1 leaves out the mixer and the other CUDA tests. NOCHECK=1 leaves out memcheck and the parallel tests.
# A flash failure with AB set reruns the flash tests with each switch at 0, then stops.
# SAN_TIMEOUT: each sanitizer's limit in s (default 300: racecheck passed 150 s with ten
# dK dV instances compiled in, and takes 40 s on one).
# About 560 s on an H100 with four switches and NCU=1 (QUICK=1: about 80 s less).
# Logs under $OUT (default /tmp/o).
set -u; O=${OUT:-/tmp/o}; mkdir -p $O; B=build-gpu; T0=$SECONDS
el() { echo "+$((SECONDS - T0))s"; }
sanitize() {  # compute-sanitizer tool $1 on the warpgroup kernels (forward, fused dK dV) over the parity cases
  timeout ${SAN_TIMEOUT:-300} compute-sanitizer --tool $1 --error-exitcode 9 --kernel-name kns=sm90 $B/loom_cuda_tests \
    --gtest_filter='CudaFlashAttention.MatchesTheCpuTwinOverLengthsHeadDimsGroupsAndMasks' > $O/$1.log 2>&1
  echo "$1 rc $? $(el)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED|rror" $O/$1.log | head -4
}
outcome() { grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \] [A-Z]" $1 | sort | uniq | head; grep -B3 -A10 Failure $1 | head -30; }
cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > $O/configure.log 2>&1 || { tail -20 $O/configure.log; exit 1; }
cmake --build $B -j16 --target loom_cuda_tests loom_cuda_parallel_tests loom-bench > $O/build.log 2>&1 ||
  { grep -B2 -A8 error $O/build.log | head -60; exit 1; }
echo "built $(el)"; nvidia-smi -L
timeout 250 $B/loom_cuda_tests --gtest_filter="${PARITY:-CudaWgmma*:CudaFlashAttention*}" > $O/flash.log 2>&1
rc=$?; echo "wgmma check, flash (both families) rc $rc $(el)"; outcome $O/flash.log
if [ $rc -ne 0 ] && [ -n "${AB:-}" ]; then  # a failure with switches named: the failed tests, each switch off in turn; stop
  failed=$(grep -oE "^\[  FAILED  \] [A-Za-z0-9_]+\.[A-Za-z0-9_]+ \(" $O/flash.log | awk '{print $4}' | sort -u | paste -sd:)
  for item in $AB; do
    name=${item%%=*}
    timeout 250 env $name=0 $B/loom_cuda_tests --gtest_filter="${failed:-CudaWgmma*:CudaFlashAttention*}" > $O/flash-$name-0.log 2>&1
    echo "$name=0: flash rc $? $(el)"; outcome $O/flash-$name-0.log
  done
  exit 1
fi
if [ -n "${AB:-}" ]; then  # AB="NAME[=v1,v2] ...": each switch alternated twice (values 0,1 by default)
  for item in $AB; do
    name=${item%%=*}; values=${item#*=}; [ "$values" = "$item" ] && values="0,1"
    for pass in 1 2; do for w in ${values//,/ }; do
      timeout 60 env $name=$w $B/loom-bench --families attention --seq 32768 --reps 10 --rows "flash" > $O/ab-$name-$w-$pass.log 2>&1
      echo "$name=$w pass $pass:"; grep -E "^flash (fwd|fwd\+bwd|s2 fwd|s2 fwd\+bwd) " $O/ab-$name-$w-$pass.log
    done; done
  done
  echo "a/b $(el)"
fi
sanitize racecheck
timeout 120 $B/loom-bench --families attention --seq 32768 --reps 10 --json $O/bench.json > $O/bench.log 2>&1
timeout 150 python3 tools/bench_torch.py --reps 10 $O/bench.json > $O/torch.log 2>&1
echo "table rc $? $(el)"; grep -A14 "== attention" $O/torch.log
for r in "flash s2" cudnn; do
  timeout 60 $B/loom-bench --families attention --seq 131072 --reps 10 --rows "$r" > $O/b128-${r// /_}.log 2>&1
  echo "128K $r rc $?"; grep -E "fwd" $O/b128-${r// /_}.log
done
if [ -z "${QUICK:-}" ]; then
  timeout 60 $B/loom-bench --families mixer --reps 10 > $O/mixer.log 2>&1; echo "mixer rc $? $(el)"; grep -A6 "== mixer" $O/mixer.log
fi
if [ -z "${NOCHECK:-}" ]; then
  sanitize memcheck
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 90 mpirun -np 1 $B/loom_cuda_parallel_tests \
    > $O/cuda_parallel.log 2>&1; echo "cuda parallel (1 rank) rc $? $(el)"; outcome $O/cuda_parallel.log
fi
NSEQ=${NCU_SEQ:-16384}; NROWS=${NCU_ROWS:-flash fwd+bwd}
if [ -n "${NCU:-}" ]; then  # NCU=1: where the warpgroup kernels stall (one launch each)
  for k in flash_forward_sm90 flash_dkdv_sm90; do
    timeout 90 ncu --clock-control none -k "regex:$k" --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy \
      --section MemoryWorkloadAnalysis \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      $B/loom-bench --families attention --seq $NSEQ --reps 10 --rows "$NROWS" > $O/ncu-$k.txt 2>&1
    echo "ncu $k rc $? $(el)"
    grep -E "Duration|Compute \(SM\) Throughput|Eligible Warps|Issued Warp|Registers Per|Achieved Occ|L2 Hit|stalled_" $O/ncu-$k.txt |
      grep -vE " 0(\.0+)?$" | head -30
  done
fi
if [ -n "${SASS:-}" ]; then  # SASS=1: the warpgroup kernels' machine code, and where their warps wait per instruction
  cuobjdump --dump-sass $B/kernels/CMakeFiles/loom_kernels.dir/cuda/flash_sm90.cu.o > $O/flash_sm90.sass 2>&1
  echo "cuobjdump rc $?"; gzip -kf $O/flash_sm90.sass
  # Each entry: the mangled name's start of one kernel that runs by default (its ncu name: up to "ILi").
  for sk in ${SASS_KERNELS:-flash_forward_sm90_kernelILi128 flash_dkdv_sm90_kernelILi128}; do
    k=${sk%%ILi*}
    timeout 120 ncu --clock-control none -k "regex:$k" --launch-skip 2 --launch-count 1 --section SourceCounters \
      --section WarpStateStats -f -o $O/src-$k $B/loom-bench --families attention --seq $NSEQ --reps 10 \
      --rows "$NROWS" > $O/ncu-src-$k.log 2>&1
    echo "ncu source $k rc $?"
    ncu --import $O/src-$k.ncu-rep --page source --print-source sass --csv > $O/src-$k.csv 2> $O/src-$k.err
    echo "source page rc $?"; head -c 400 $O/src-$k.err
    python3 tools/sass_summary.py $O/flash_sm90.sass --kernel "$sk" --stalls $O/src-$k.csv --top 40
    gzip -f $O/src-$k.csv; rm -f $O/src-$k.ncu-rep
  done
  echo "sass $(el)"
fi
if [ -z "${QUICK:-}" ]; then
  timeout 200 $B/loom_cuda_tests --gtest_filter='-CudaWgmma*:CudaFlashAttention*' > $O/cuda_tests.log 2>&1
  echo "other cuda tests rc $? $(el)"; outcome $O/cuda_tests.log
fi
echo "done $(el)"

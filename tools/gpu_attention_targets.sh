#!/usr/bin/env bash
# Issue 7's speed targets on both input fills, in one short GPU call: build loom-bench; at 32K the
# native flash and loom's cuDNN graph rows beside PyTorch SDPA (flash and cuDNN backends, randn
# inputs: tools/bench_torch.py); at 128K S2 and dense cuDNN on normal inputs (loom-bench's default,
# as SDPA's) and on the constant fills of the tables before 2026-12-06 (--data const), with the
# SM clock and power sampled every 100 ms (nvidia-smi) over each row. About 4 minutes on an H100.
# PARITY=1 also builds and runs the flash parity tests first. Logs under $OUT (default /tmp/o).
set -u; O=${OUT:-/tmp/o}; mkdir -p $O; B=build-gpu; T0=$SECONDS
el() { echo "+$((SECONDS - T0))s"; }
nvidia-smi -L
targets="loom-bench"; [ -n "${PARITY:-}" ] && targets="loom-bench loom_cuda_tests"
cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > $O/configure.log 2>&1 &&
  cmake --build $B -j16 --target $targets > $O/build.log 2>&1 || { grep -B2 -A8 error $O/build.log | head -40; exit 1; }
echo "built $(el)"
if [ -n "${PARITY:-}" ]; then
  timeout 120 $B/loom_cuda_tests --gtest_filter="CudaFlashAttention*:FlashKeyBlocks*:CudaWgmma*" > $O/parity.log 2>&1
  echo "parity rc $? $(el)"; grep -E "^\[  (PASSED|FAILED)|^\[  FAILED|Failure" $O/parity.log | head -20
fi
for r in "flash fwd" "cudnn fwd"; do
  timeout 60 $B/loom-bench --families attention --seq 32768 --reps 10 --rows "$r" --json $O/l32.json > $O/l32.log 2>&1
  echo "loom 32K \"$r\" rc $? $(el)"
  timeout 90 python3 tools/bench_torch.py $O/l32.json > $O/torch32-${r// /_}.log 2>&1
  echo "torch rc $? $(el)"; sed -n '/== attention/,$p' $O/torch32-${r// /_}.log | head -8
done
# One sample file per row: nvidia-smi writes at its own offset, so a marker appended to a shared file is lost.
for d in normal const; do for r in "flash s2 fwd" "cudnn fwd"; do
  nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader -lms 100 > $O/clocks-$d-${r// /_}.csv 2>&1 &
  smi=$!
  timeout 60 $B/loom-bench --families attention --seq 131072 --reps 10 --rows "$r" --data $d > $O/l128.log 2>&1
  rc=$?; kill $smi; echo "128K \"$r\" $d rc $rc"; grep -E "fwd" $O/l128.log
done; done
python3 - $O/clocks-*.csv <<'PY'
import re, sys
for path in sys.argv[1:]:
    name = path.rsplit("clocks-", 1)[1][:-4]
    s = [(int(m.group(1)), float(m.group(2))) for m in
         (re.match(r"\s*(\d+) MHz, ([\d.]+) W", line) for line in open(path)) if m]
    busy = [x for x in s if x[1] > 250] or s
    if busy:
        mhz, watts = [c for c, _ in busy], [w for _, w in busy]
        print(f"clocks {name}: {len(busy)} samples over 250 W; SM MHz mean {sum(mhz) / len(mhz):.0f}, "
              f"min {min(mhz)}; W mean {sum(watts) / len(watts):.0f}, max {max(watts):.0f}")
PY
echo "done $(el)"

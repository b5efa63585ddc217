#!/usr/bin/env bash
# GPU-machine verification in one call: build, every CUDA test, the CUDA
# placement tests of the CPU suites, NCCL at world size 1, compute-sanitizer on
# the kernel tests, and short trainings on the GPU. Logs go to $OUT (or ./gpu-out).
#   bash tools/gpu_check.sh [corpus.txt.gz]      (the demo corpus; default: Debian's Jargon File)
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
B=build-gpu
TEXT=${1:-}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
step() { echo "== $* ($(date +%T))"; }
step configure
cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
step build
cmake --build $B -j"$(nproc)" --target loom_cuda_tests loom_cuda_parallel_tests loom-train loom_ops_nn_tests \
  loom_ops_tensor_tests loom_lightning_tests loom_core_tests loom-bench loom-bench-lightning > "$OUT/build.log" 2>&1 \
  || { grep -B2 -A8 -E "error|Error" "$OUT/build.log" | head -80; exit 1; }
summary() { grep -E "^\[  (PASSED|FAILED) |^\[  SKIPPED \] [0-9]" "$1" | sort | uniq | head -30; }
step cuda tests
timeout 300 $B/loom_cuda_tests > "$OUT/cuda_tests.log" 2>&1; echo "rc $?"; summary "$OUT/cuda_tests.log"
grep -A4 "Failure" "$OUT/cuda_tests.log" | head -40
step CUDA placement tests of the CPU suites
for t in ops_nn ops_tensor lightning core; do
  timeout 120 $B/loom_${t}_tests --gtest_filter='*Cuda*:*cuda*' > "$OUT/${t}_cuda.log" 2>&1; echo "$t rc $?"; summary "$OUT/${t}_cuda.log"
done
step NCCL world size 1
timeout 120 mpirun -np 1 $B/loom_cuda_parallel_tests > "$OUT/cuda_parallel_np1.log" 2>&1; echo "rc $?"; summary "$OUT/cuda_parallel_np1.log"
grep -E "^\[(overlap|solo|RingHop|ring)" "$OUT/cuda_parallel_np1.log" | head -6
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then
  step "NCCL and sequence parallelism on $NGPU GPUs (np 2)"
  timeout 180 mpirun -np 2 $B/loom_cuda_parallel_tests > "$OUT/cuda_parallel_np2.log" 2>&1; echo "rc $?"
  summary "$OUT/cuda_parallel_np2.log"; grep -E "^\[(overlap|solo|RingHop|ring)" "$OUT/cuda_parallel_np2.log" | head -8
fi
step compute-sanitizer memcheck
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 $B/loom_cuda_tests \
  --gtest_filter='CudaElementwise*:CudaReduce*:CudaSoftmax*:CudaCrossEntropy*:CudaAdamW*:CudaGradNorm*:CudaAttention.Backward*:CudaFlashAttention.BackwardIsDeterministic:CudaFlashAttention.Dispatch*:CudaLightning.TwoChained*:CudaMoe*:CudaTensor*:CudaRmsNorm*:CudaRope*:CudaEmbedding*:CudaSwiglu*' \
  > "$OUT/memcheck.log" 2>&1; echo "rc $?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" | tail -3
step "benchmarks (loom-bench beside PyTorch on the same card)"
timeout 240 $B/loom-bench --json "$OUT/loom-bench.json" > "$OUT/loom-bench.log" 2>&1; echo "bench rc $?"
timeout 300 python3 tools/bench_torch.py "$OUT/loom-bench.json" > "$OUT/bench-torch.log" 2>&1; echo "torch rc $?"
grep -A12 "== attention" "$OUT/bench-torch.log"
timeout 60 $B/loom-bench-lightning --reps 10 > "$OUT/bench-lightning.log" 2>&1; echo "lightning bench rc $?"
step trainings on the GPU
TEXTARG=(); [ -n "$TEXT" ] && TEXTARG=("data.text=$TEXT")
RUNS=${RUNS:-/tmp/loom-gpu-runs}
COMMON=("log.dir=$RUNS" "log.progress=off" "checkpoint.every=0" "train.resume=none" "${TEXTARG[@]}")
# The demo at one rank with the global batch of the 2-rank CPU run (2 x 8), bf16 and f32.
for dt in bf16 f32; do
  timeout 240 $B/loom-train launch/recipes/demo.yaml train.device=cuda train.dtype=$dt train.micro_batch_size=16 \
    log.name=demo-cuda-$dt "${COMMON[@]}" > "$OUT/demo-cuda-$dt.log" 2>&1; echo "demo $dt rc $?"
  grep -E "^step (10|100|250|500)/|val|done" "$OUT/demo-cuda-$dt.log" | tail -8
done
# Head dim 64 (2 query heads, 1 kv head) so the flash kernels apply: native (flash) against interim, bf16.
for backend in native interim; do
  timeout 240 $B/loom-train launch/recipes/demo.yaml train.device=cuda train.dtype=bf16 train.micro_batch_size=16 \
    model.n_heads=2 model.n_kv_heads=1 model.attention_backend=$backend log.name=demo-attn-$backend "${COMMON[@]}" \
    > "$OUT/demo-attn-$backend.log" 2>&1; echo "demo attention $backend rc $?"
  grep -E "val|done" "$OUT/demo-attn-$backend.log" | tail -4
done
if [ "$NGPU" -ge 2 ]; then
  # Data parallelism (2 x 8) and sequence parallelism (cp 2, ring, 1 x 16) on two GPUs: same global batch.
  timeout 200 mpirun -np 2 $B/loom-train launch/recipes/demo.yaml train.device=cuda train.dtype=bf16 \
    log.name=demo-dp2 "${COMMON[@]}" > "$OUT/demo-dp2.log" 2>&1; echo "demo dp2 rc $?"
  grep -E "^step (250|500)/|val loss|done|rror" "$OUT/demo-dp2.log" | tail -8
  timeout 200 mpirun -np 2 $B/loom-train launch/recipes/demo.yaml train.device=cuda train.dtype=bf16 parallel.cp=2 \
    train.micro_batch_size=16 log.name=demo-cp2 "${COMMON[@]}" > "$OUT/demo-cp2.log" 2>&1; echo "demo cp2 rc $?"
  grep -E "^step (250|500)/|val loss|done|rror" "$OUT/demo-cp2.log" | tail -8
fi
if [ "$NGPU" -ge 2 ]; then
  # cp scaling at equal tokens per GPU: an LLLS hybrid (d 1024, 8 layers) at 8K tokens on one GPU,
  # 16K over cp = 2 (zigzag, ring for S, LASP-2 for L). Steps 3..12 are averaged by the log line.
  SCALE=(model.d_model=1024 model.n_heads=8 model.n_kv_heads=8 model.n_layers=8 model.max_seq_len=16384
         train.micro_batch_size=1 train.steps=12 train.eval_every=0 train.sample_every=0 train.log_every=4
         optim.warmup_steps=2 train.device=cuda train.dtype=bf16)
  timeout 150 $B/loom-train launch/recipes/hybrid-cp.yaml parallel.cp=1 data.seq_len=8192 "${SCALE[@]}" \
    log.name=scale-cp1 "${COMMON[@]}" > "$OUT/scale-cp1.log" 2>&1; echo "scale cp1 rc $?"
  grep -E "^step 12/|rror" "$OUT/scale-cp1.log" | cut -c1-220
  timeout 150 mpirun -np 2 $B/loom-train launch/recipes/hybrid-cp.yaml parallel.cp=2 data.seq_len=16384 "${SCALE[@]}" \
    log.name=scale-cp2 "${COMMON[@]}" > "$OUT/scale-cp2.log" 2>&1; echo "scale cp2 rc $?"
  grep -E "^step 12/|rror" "$OUT/scale-cp2.log" | cut -c1-220
fi
for r in gated moh s2 moe lightning hybrid-cp; do
  timeout 60 $B/loom-train launch/recipes/$r.yaml train.device=cuda train.dtype=bf16 train.steps=50 parallel.cp=1 \
    train.eval_every=25 log.name=$r-cuda "${COMMON[@]}" > "$OUT/$r-cuda.log" 2>&1; echo "$r rc $?"
  grep -E "^step (10|50)/|val loss|done|rror" "$OUT/$r-cuda.log" | tail -4 | cut -c1-200
done
for d in "$RUNS"/*/; do [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$OUT/metrics-$(basename "$d").jsonl"; done
step end

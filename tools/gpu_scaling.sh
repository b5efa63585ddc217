#!/usr/bin/env bash
# Issue 9 in one call on a machine with G GPUs (G = nvidia-smi's count): build;
# the NCCL multi-rank suite at np G; per-layer cp scaling with loom-bench-sp
# (L = LASP-2, S ring, S all-gather = LASP-2H; bf16, d 2048, 16 heads, TOKENS
# tokens per GPU, cp = 1, 2, 4, ... G; efficiency = tokens/s per GPU over cp 1's);
# the hybrid recipe's end-to-end tokens/s per GPU at the same cps; and the
# longest sequence the hybrid trains at cp = G (doubling from 64K until a run
# fails), with its memory. Logs go to $OUT (at most 6 files).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; B=build-gpu; TOKENS=${TOKENS:-16384}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
G=$(nvidia-smi -L | wc -l)
{ cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
  cmake --build $B -j"$(nproc)" --target loom_cuda_parallel_tests loom-bench-sp loom-train; } > "$OUT/build.log" 2>&1 \
  || { grep -B2 -A8 -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
echo "built at ${SECONDS}s; $G GPUs"
timeout 300 mpirun -np "$G" $B/loom_cuda_parallel_tests > "$OUT/nccl_tests.log" 2>&1
echo "NCCL suite at np $G: rc $?"; grep -E "^\[  (PASSED|FAILED) " "$OUT/nccl_tests.log" | sort | uniq
cps=(); for p in 1 2 4 8; do [ "$p" -le "$G" ] && cps+=("$p"); done
for layer in "L" "S ring" "S allgather"; do
  set -- $layer; args=(--layer "$1"); [ -n "${2:-}" ] && args+=(--softmax "$2")
  for p in "${cps[@]}"; do
    timeout 300 mpirun -np "$p" $B/loom-bench-sp "${args[@]}" --device cuda --dtype bf16 --d-model 2048 --heads 16 \
      --tokens-per-rank "$TOKENS" --reps 10 2>&1 | tail -1 | sed "s/^/$layer /"
  done
done | tee "$OUT/layers.txt" | awk '{key=$1 ($2 ~ /^[a-z]/ ? " " $2 : ""); n=split($0, f); tok=f[n-1];
  if (!(key in base)) base[key]=tok; printf "%s  efficiency %.3f\n", $0, tok / base[key]}'
RUNS=/tmp/loom-scaling; rm -rf $RUNS
# data.task=recall: synthetic sequences of any length (the machine has no corpus; the content does not matter here)
COMMON=(data.task=recall model.d_model=2048 model.n_heads=16 model.n_kv_heads=16 model.n_layers=8 train.device=cuda train.dtype=bf16
        train.micro_batch_size=1 train.steps=12 train.eval_every=0 train.sample_every=0 train.log_every=4
        optim.warmup_steps=2 log.dir=$RUNS log.progress=off checkpoint.every=0 train.resume=none)
for p in "${cps[@]}"; do
  T=$((TOKENS * p))
  timeout 300 mpirun -np "$p" $B/loom-train launch/recipes/hybrid-cp.yaml parallel.cp="$p" data.seq_len=$T \
    model.max_seq_len=$T log.name="scale-cp$p" "${COMMON[@]}" 2>&1 | grep -E "^step 12/|rror" | tail -1 \
    | sed "s/^/cp $p T $T: /"
done | tee "$OUT/hybrid.txt"
T=65536
while [ $T -le $((1 << 23)) ]; do
  line=$(timeout 400 mpirun -np "$G" $B/loom-train launch/recipes/hybrid-cp.yaml parallel.cp="$G" data.seq_len=$T \
    model.max_seq_len=$T log.name="long-$T" "${COMMON[@]}" train.activation_checkpointing=true train.steps=2 \
    train.log_every=1 2>&1 | grep -E "^step 2/|rror|out of memory" | tail -1)
  echo "T $T: $line" | tee -a "$OUT/longest.txt"
  echo "$line" | grep -q "^step 2/" || break
  T=$((T * 2))
done

#!/usr/bin/env bash
# A same-run A/B of the working tree (A) against other versions of some of its files, in one GPU
# call. BASE="DIR..." names one folder per other version (named by the folder's name), each
# holding that version's files at their repository paths (made here with
# `git archive REV FILE... | tar -x -C DIR`; the folders ignored through .git/info/exclude and
# named in the call's carry). Builds A, keeps its loom-bench and flash_sm90 object, then for each
# folder copies it over the tree, builds incrementally and puts A's files back (the build folder
# ends with the last version's objects; each version's binary and flash_sm90 object stay in
# /tmp/ab-NAME). Then each entry of RUNS (';'-separated SEQ:ROWS, loom-bench's --seq and --rows;
# default "32768:flash fwd;32768:flash s2"; SEQ:ROWS:DATA times with --data DATA, normal (the
# default) or const),
# the versions alternated PASSES times (default 2).
# AFTER_A: a command run right after A's build, on A's tree and build folder (parity tests, say).
# Logs under $OUT (default /tmp/o).
set -u; O=${OUT:-/tmp/o}; mkdir -p $O; B=${B_DIR:-build-gpu}; T0=$SECONDS
el() { echo "+$((SECONDS - T0))s"; }
for d in ${BASE:-}; do [ -d "$d" ] || { echo "BASE: $d is not a folder of files"; exit 2; }; done
[ -n "${BASE:-}" ] || { echo "BASE names no folder"; exit 2; }
build() {
  cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > $O/configure-$1.log 2>&1 &&
    cmake --build $B -j16 --target loom-bench > $O/build-$1.log 2>&1 || { grep -B2 -A8 error $O/build-$1.log | head -40; exit 1; }
  mkdir -p /tmp/ab-$1 && cp $B/loom-bench /tmp/ab-$1/ && cp $B/kernels/CMakeFiles/loom_kernels.dir/cuda/flash_sm90.cu.o /tmp/ab-$1/
  echo "built $1 $(el)"
}
# A's copies of every swapped file newer than objects an earlier call built from other versions.
for d in $BASE; do (cd $d && find . -type f) | sed 's|^\./||' | while read -r f; do touch "$f"; done; done
build A
[ -n "${AFTER_A:-}" ] && { eval "$AFTER_A"; echo "after A rc $? $(el)"; }
versions=A
for d in $BASE; do
  name=$(basename $d); versions="$versions $name"
  files=$(cd $d && find . -type f | sed 's|^\./||')
  rm -rf /tmp/ab-keep; for f in $files; do mkdir -p /tmp/ab-keep/$(dirname $f); cp $f /tmp/ab-keep/$f; cp $d/$f $f; done
  build $name
  for f in $files; do cp /tmp/ab-keep/$f $f; done
done
IFS=';' read -ra runs <<< "${RUNS:-32768:flash fwd;32768:flash s2}"
for run in "${runs[@]}"; do
  seq=${run%%:*}; r=${run#*:}; data=normal
  [[ $r == *:* ]] && { data=${r##*:}; r=${r%:*}; }
  for pass in $(seq ${PASSES:-2}); do for v in $versions; do
    log=$O/ab-$v-$seq-${r// /_}-$data-$pass.log
    timeout 120 /tmp/ab-$v/loom-bench --families attention --seq $seq --reps 10 --rows "$r" --data $data > $log 2>&1
    echo "$v seq $seq \"$r\" $data pass $pass rc $?:"; grep -E "fwd" $log | sed 's/^/  /'
  done; done
done
echo "a/b done $(el)"

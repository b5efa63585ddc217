#!/usr/bin/env bash
# Where a kernel's register spills sit: for each function in the object file
# $1 whose name matches $2 (a grep pattern), the local loads/stores (LDL/STL)
# in all and those between its first and last tensor-core instruction (HMMA),
# i.e. in the main loop rather than in the prologue or epilogue.
set -u
cuobjdump -sass "$1" | awk -v pat="${2:-.}" '
  function flush() {
    if (name != "" && name ~ pat) {
      inside = 0
      for (i = 1; i <= nl; ++i) if (line[i] > first && line[i] < last) ++inside
      printf "%-70s HMMA %5d  LDL+STL %4d  in the HMMA span %4d\n", substr(name, 1, 70), hm, nl, inside
    }
    name = ""; hm = 0; nl = 0; first = 0; last = 0
  }
  /Function :/ { flush(); name = $3 }
  /HMMA/ { ++hm; if (!first) first = NR; last = NR }
  /LDL|STL/ { line[++nl] = NR }
  END { flush() }'

# ctest script: compiles the sources that issue warpgroup products (wgmma) for sm_90a with ptxas's
# report (-Xptxas -v) and fails where ptxas says it serialized them ("wgmma.mma_async instructions
# are serialized", C751x): such a kernel still computes the right result, only slower, so no
# parity test notices. Arguments: NVCC, ROOT (the source tree), SOURCES (comma-separated, relative
# to ROOT).
foreach(var NVCC ROOT SOURCES)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "ptxas check: -D${var}=... is missing")
  endif()
endforeach()
string(REPLACE "," ";" SOURCES "${SOURCES}")
set(bad "")
foreach(src ${SOURCES})
  execute_process(
    COMMAND ${NVCC} -std=c++17 --expt-relaxed-constexpr -O3 -DNDEBUG -DLOOM_WITH_CUDA=1 -DLOOM_CUDA_SM90A=1
            -I${ROOT} --generate-code=arch=compute_90a,code=sm_90a -Xptxas -v -c ${ROOT}/${src} -o /dev/null
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "ptxas check: compiling ${src} failed (${rc}):\n${err}")
  endif()
  string(REGEX MATCHALL "[^\n]*instructions are serialized[^\n]*" hits "${out}\n${err}")
  list(LENGTH hits n)
  message(STATUS "${src}: ${n} serialization reports")
  foreach(h ${hits})
    string(APPEND bad "${src}: ${h}\n")
  endforeach()
endforeach()
if(NOT bad STREQUAL "")
  message(FATAL_ERROR "ptxas serialized warpgroup products:\n${bad}")
endif()

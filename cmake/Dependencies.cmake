# Finds loom's dependencies (nothing is downloaded) and prints one line per
# dependency: found with its version, or why it is missing and which Debian
# package provides it. Required ones stop the configure step when missing.

set(LOOM_MISSING_REQUIRED "")

function(loom_report name found version hint required)
  if(found)
    message(STATUS "loom dependency: ${name} found (version ${version})")
  elseif(required)
    message(STATUS "loom dependency: ${name} MISSING (required; ${hint})")
    set(LOOM_MISSING_REQUIRED "${LOOM_MISSING_REQUIRED} ${name}" PARENT_SCOPE)
  else()
    message(STATUS "loom dependency: ${name} missing (optional; ${hint})")
  endif()
endfunction()

# "9.19.0" from `#define <PREFIX>_<PART> <n>` lines of a header ("" when absent).
function(loom_header_version out header prefix parts)
  set(version "")
  if(EXISTS "${header}")
    foreach(part ${parts})
      file(STRINGS "${header}" line REGEX "#define ${prefix}_${part} +[0-9]+")
      string(REGEX REPLACE ".*#define ${prefix}_${part} +([0-9]+).*" "\\1" number "${line}")
      list(APPEND version ${number})
    endforeach()
    string(REPLACE ";" "." version "${version}")
  endif()
  set(${out} "${version}" PARENT_SCOPE)
endfunction()

find_package(PkgConfig QUIET)

# fmt, spdlog
find_package(fmt QUIET)
loom_report(fmt "${fmt_FOUND}" "${fmt_VERSION}" "apt-get install libfmt-dev" TRUE)
find_package(spdlog QUIET)
loom_report(spdlog "${spdlog_FOUND}" "${spdlog_VERSION}" "apt-get install libspdlog-dev" TRUE)

# OpenBLAS (matrix products on CPU)
set(LOOM_OPENBLAS_FOUND FALSE)
if(PkgConfig_FOUND)
  pkg_check_modules(OPENBLAS QUIET IMPORTED_TARGET openblas)
  if(OPENBLAS_FOUND)
    set(LOOM_OPENBLAS_FOUND TRUE)
    set(LOOM_OPENBLAS_VERSION ${OPENBLAS_VERSION})
  endif()
endif()
loom_report(OpenBLAS "${LOOM_OPENBLAS_FOUND}" "${LOOM_OPENBLAS_VERSION}" "apt-get install libopenblas-dev" TRUE)

# OpenMP (CPU kernel threading)
find_package(OpenMP QUIET)
loom_report(OpenMP "${OpenMP_CXX_FOUND}" "${OpenMP_CXX_VERSION}" "comes with the compiler" TRUE)

# MPI
find_package(MPI QUIET COMPONENTS C)
loom_report(MPI "${MPI_C_FOUND}" "${MPI_C_VERSION}" "apt-get install openmpi-bin libopenmpi-dev" TRUE)

# HDF5 (checkpoints)
find_package(HDF5 QUIET COMPONENTS C CXX)
loom_report(HDF5 "${HDF5_FOUND}" "${HDF5_VERSION}" "apt-get install libhdf5-dev" TRUE)

# Boost (header-only parts)
find_package(Boost 1.74 QUIET)
loom_report(Boost "${Boost_FOUND}" "${Boost_VERSION}" "apt-get install libboost-dev" TRUE)

# yaml-cpp (recipes)
find_package(yaml-cpp QUIET)
loom_report(yaml-cpp "${yaml-cpp_FOUND}" "${yaml-cpp_VERSION}" "apt-get install libyaml-cpp-dev" TRUE)

# nlohmann-json (metrics, safetensors headers, checkpoint index)
find_package(nlohmann_json QUIET)
loom_report(nlohmann-json "${nlohmann_json_FOUND}" "${nlohmann_json_VERSION}" "apt-get install nlohmann-json3-dev" TRUE)

# CLI11 (command lines)
find_package(CLI11 QUIET)
loom_report(CLI11 "${CLI11_FOUND}" "${CLI11_VERSION}" "apt-get install libcli11-dev" TRUE)

# GoogleTest (tests are part of the default build)
find_package(GTest QUIET)
loom_report(GoogleTest "${GTest_FOUND}" "${GTest_VERSION}" "apt-get install libgtest-dev" TRUE)

# Google Benchmark (optional; loom-bench has its own timing loop)
find_package(benchmark QUIET)
loom_report(GoogleBenchmark "${benchmark_FOUND}" "${benchmark_VERSION}" "apt-get install libbenchmark-dev" FALSE)

# CUDA toolkit parts (only when CUDA is enabled)
if(LOOM_WITH_CUDA)
  find_package(CUDAToolkit REQUIRED)
  loom_report(CUDAToolkit "${CUDAToolkit_FOUND}" "${CUDAToolkit_VERSION}" "install the CUDA toolkit" TRUE)
  set(LOOM_CUBLASLT_FOUND FALSE)
  if(TARGET CUDA::cublasLt)
    set(LOOM_CUBLASLT_FOUND TRUE)
  endif()
  loom_report(cuBLASLt "${LOOM_CUBLASLT_FOUND}" "${CUDAToolkit_VERSION}" "part of the CUDA toolkit" TRUE)
  find_path(CUDNN_INCLUDE_DIR cudnn_version.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/include /usr/local/cuda/include)
  find_library(CUDNN_LIBRARY cudnn HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/lib/x86_64-linux-gnu)
  loom_header_version(LOOM_CUDNN_VERSION "${CUDNN_INCLUDE_DIR}/cudnn_version.h" CUDNN "MAJOR;MINOR;PATCHLEVEL")
  set(LOOM_CUDNN_FOUND FALSE)
  if(CUDNN_INCLUDE_DIR AND CUDNN_LIBRARY)
    set(LOOM_CUDNN_FOUND TRUE)
  endif()
  loom_report(cuDNN "${LOOM_CUDNN_FOUND}" "${LOOM_CUDNN_VERSION}" "comes with the CUDA toolkit on our machines" FALSE)
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/include)
  find_library(NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/lib/x86_64-linux-gnu)
  loom_header_version(LOOM_NCCL_VERSION "${NCCL_INCLUDE_DIR}/nccl.h" NCCL "MAJOR;MINOR;PATCH")
  set(LOOM_NCCL_FOUND FALSE)
  if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
    set(LOOM_NCCL_FOUND TRUE)
  endif()
  loom_report(NCCL "${LOOM_NCCL_FOUND}" "${LOOM_NCCL_VERSION}" "comes with the CUDA toolkit on our machines" FALSE)
else()
  message(STATUS "loom dependency: CUDA toolkit not used (LOOM_CUDA=${LOOM_CUDA}; no nvcc found or disabled)")
endif()

if(LOOM_MISSING_REQUIRED)
  message(FATAL_ERROR "loom: missing required dependencies:${LOOM_MISSING_REQUIRED}. Run launch/setup.sh (installs them) or install the packages named above.")
endif()

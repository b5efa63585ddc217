// LOOM_CUDA_CHECK for translation units that include the CUDA runtime.
#pragma once
#include <cuda_runtime_api.h>

#include "framework/error.h"

#define LOOM_CUDA_CHECK(call) LOOM_CHECK_STATUS(call, cudaSuccess, cudaGetErrorString)

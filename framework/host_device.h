// LOOM_HOST_DEVICE marks functions compiled for the host and, under nvcc, for the
// device too: rules written once for a CPU twin and its CUDA kernel.
#pragma once

#if defined(__CUDACC__)
#define LOOM_HOST_DEVICE __host__ __device__
#else
#define LOOM_HOST_DEVICE
#endif

// Helpers shared by the multi-rank GPU tests (one GPU per rank, under
// mpirun): the world communicator, this rank's GPU, and the skip that every
// rank takes alike when the node has fewer GPUs than ranks. One copy here so
// the NCCL, softmax-SP and LASP-2 CUDA tests decide the same way.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "framework/storage.h"
#include "parallel/mesh.h"
#include "parallel/mpi_communicator.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/testing.h"

namespace loom::testing {

inline MpiCommunicator& world() { return mpi_context().world(); }

// The reason every rank skips ("" when each rank has its own GPU), from values
// equal on all ranks of a node, so all ranks take the same path.
inline std::string gpu_per_rank_skip_reason() {
  std::string reason = gpu_skip_reason();
  if (!reason.empty()) return reason;
  const int local_size = mpi_context().local_size();
  if (cuda_device_count() < local_size)
    return std::to_string(local_size) + " ranks on this node but only " + std::to_string(cuda_device_count()) +
           " GPU(s); NCCL needs one GPU per rank";
  return "";
}

// This rank's GPU (the local rank's device).
inline Device my_gpu() { return select_device("cuda", world()); }

// Same seeds on every rank: every rank holds the same global tensors, on its
// device (values drawn in f32, then rounded to `dtype`).
inline Tensor global_tensor(const Shape& shape, uint64_t seed, DType dtype, Device device) {
  return random_tensor(shape, seed, DType::f32).to(dtype).to(device);
}

}  // namespace loom::testing

// Skips the test (on every rank alike) without a GPU per rank; `what` names
// the test in the message ("NCCL test" -> "NCCL test skipped: <reason>").
#define LOOM_SKIP_WITHOUT_GPU_PER_RANK(what)                                              \
  do {                                                                                    \
    std::string loom_reason_ = ::loom::testing::gpu_per_rank_skip_reason();               \
    if (!loom_reason_.empty()) GTEST_SKIP() << what << " skipped: " << loom_reason_;      \
  } while (0)

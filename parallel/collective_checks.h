// Argument checks shared by the Communicator backends: every collective checks
// its tensors the same way whatever carries the bytes, and the messages name
// the operation, the group, the shapes and the rank count.
#pragma once

#include <vector>

#include "framework/tensor.h"

namespace loom {

class Communicator;

namespace detail {

// `t` is defined and contiguous; `op` and `arg` name the call ("all_gather", "out").
void check_collective_tensor(const Communicator& comm, const Tensor& t, const char* op, const char* arg);
// Same dtype for the two tensors of one call.
void check_same_dtype(const Communicator& comm, const Tensor& a, const Tensor& b, const char* op);
// `big` is `small` with dim 0 multiplied by the group size P (a shape () `small`
// pairs with a (P) `big`): all_gather out/in, reduce_scatter in/out.
void check_block_shapes(const Communicator& comm, const Tensor& big, const char* big_name, const Tensor& small,
                        const char* small_name, const char* op);
// `peer` is a valid rank of the group.
void check_peer(const Communicator& comm, int peer, const char* what, const char* op);
// Same shape after dim 0 (the rows of an all_to_all_v).
void check_row_shapes(const Communicator& comm, const Tensor& out, const Tensor& in, const char* op);
// One count per rank, none negative, summing to dim 0 of `t`; returns the elements per row.
int64_t check_splits(const Communicator& comm, const Tensor& t, const std::vector<int64_t>& splits, const char* arg,
                     const char* op);

}  // namespace detail
}  // namespace loom

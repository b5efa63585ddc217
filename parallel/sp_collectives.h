// Differentiable collectives: communication inside the model as autograd ops
// in conjugate pairs (STYLE.md 9), each one autograd node whose backward is the
// adjoint collective. Sequence-parallel layers (LASP-2, ring / all-gather
// attention, global loss statistics) compose these instead of calling the
// Communicator on raw tensors where gradients must flow.
//
// Convention: the training objective is the SUM over the group's ranks of each
// rank's local loss ("shares"; DecoderLM::loss under cp returns this rank's
// share). The adjoints below follow from it: e.g. every rank's all-gathered
// copy feeds its own share, so the gradient of a rank's block is the sum over
// ranks of the gradients of its copies (reduce-scatter).
//
// Every rank of `comm` must call the op with the same shapes, and every rank's
// backward must reach the op (each rank's loss depends on its output), since
// backward runs the adjoint collective on every rank; an undefined output
// gradient counts as zeros. `comm` must outlive the backward pass.
// Tensors live on the CPU for the MPI backend (CUDA with NCCL later).
#pragma once

#include "framework/autograd.h"
#include "parallel/communicator.h"

namespace loom::sp {

// forward all-gather along `dim` (rank order) / backward reduce-scatter (sum) along `dim`.
// x (..., N, ...) -> (..., P*N, ...)
Variable all_gather(const Variable& x, Communicator& comm, int64_t dim);

// forward reduce-scatter (sum) along `dim` / backward all-gather along `dim`.
// x (..., P*N, ...) -> (..., N, ...): block `rank` of the sum over ranks.
Variable reduce_scatter(const Variable& x, Communicator& comm, int64_t dim);

// forward all-to-all / backward all-to-all with the dims swapped (its inverse).
// x is cut into P blocks along `split_dim`; block r goes to rank r; the blocks
// received are concatenated along `concat_dim` in rank order.
// x (..., S, ..., C, ...) -> (..., S/P, ..., P*C, ...)   (split_dim == concat_dim: same shape)
Variable all_to_all(const Variable& x, Communicator& comm, int64_t split_dim, int64_t concat_dim);

// forward broadcast from `root` / backward reduce (sum) to `root` (other ranks' x get zeros).
Variable broadcast(const Variable& x, Communicator& comm, int root);

// forward reduce (sum) to `root` (other ranks' outputs are zeros) / backward broadcast from `root`.
Variable reduce(const Variable& x, Communicator& comm, int root);

// forward identity / backward all-reduce (sum): enters a region where a
// replicated value is used by every rank's share (Megatron's "copy").
Variable copy_to_group(const Variable& x, Communicator& comm);

// forward all-reduce (sum) / backward identity: leaves such a region; the
// result is replicated and consumed once (Megatron's "reduce").
Variable reduce_from_group(const Variable& x, Communicator& comm);

// forward all-reduce (sum) / backward all-reduce (sum): a global statistic that
// every rank then uses in its own share (e.g. the MoE router's mean probability
// over the whole sequence); the composition of the two ops above.
Variable all_reduce_sum(const Variable& x, Communicator& comm);

}  // namespace loom::sp

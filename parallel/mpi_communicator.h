// MpiCommunicator: the Communicator backend for CPU tensors over an MPI
// communicator (its own duplicate, so loom's traffic never mixes with anyone
// else's). Blocking collectives complete before returning; all_reduce_async is
// MPI_Iallreduce, advanced whenever the caller polls or waits (OpenMPI has no
// progress thread). Reductions support f32, f64, i64, i32 (and u8 for sum, max,
// min; avg needs f32/f64); bf16/f16 are rejected there, but travel as raw bits
// wherever bytes are only copied (all_gather, broadcast, send/recv, all_to_all).
//
// Every MPI call is checked (the communicator returns errors instead of
// aborting). With check_consistency on, each collective first compares its
// sizes, dtype and op across the group (one small extra all-reduce) and every
// rank throws the same error on a mismatch instead of hanging or corrupting
// memory: a debugging aid, off by default.
#pragma once

// C API only: the deprecated C++ bindings would need libmpi_cxx at link time.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>

#include "parallel/communicator.h"

namespace loom {

struct MpiCommunicatorOptions {
  bool check_consistency = false;  // cross-rank size/dtype/op check before each collective
};

class MpiCommunicator : public Communicator {
 public:
  // Duplicates `comm` (collective over it); the duplicate is freed with this object.
  MpiCommunicator(MPI_Comm comm, std::string name, MpiCommunicatorOptions options = {});
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  // MPI_Comm_split of this group (collective over it): ranks with the same
  // `color` form a new group, ordered by `key`. Options are inherited.
  std::unique_ptr<MpiCommunicator> split(int color, int key, std::string name) const;

  MPI_Comm comm() const { return comm_; }
  void set_check_consistency(bool on) { options_.check_consistency = on; }
  bool check_consistency() const { return options_.check_consistency; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  void all_reduce(Tensor& tensor, ReduceOp op, Stream& stream) override;
  void all_gather(Tensor& out, const Tensor& in, Stream& stream) override;
  void reduce_scatter(Tensor& out, const Tensor& in, ReduceOp op, Stream& stream) override;
  void broadcast(Tensor& tensor, int root, Stream& stream) override;
  void send(const Tensor& tensor, int dst, Stream& stream) override;
  void recv(Tensor& tensor, int src, Stream& stream) override;
  void send_recv(const Tensor& send_tensor, int dst, Tensor& recv_tensor, int src, Stream& stream) override;
  void all_to_all(Tensor& out, const Tensor& in, Stream& stream) override;
  void barrier() override;
  std::unique_ptr<Work> all_reduce_async(Tensor& tensor, ReduceOp op, Stream& stream) override;
  void all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                    const std::vector<int64_t>& in_splits, Stream& stream) override;

 private:
  struct Adopt {};
  MpiCommunicator(Adopt, MPI_Comm comm, std::string name, MpiCommunicatorOptions options);
  // With check_consistency on: every rank passes the same named fields, and all
  // ranks throw (naming the field, the group's min and max and this rank's
  // value) when any field differs between ranks.
  void check_consistent(const char* op, std::initializer_list<std::pair<const char*, int64_t>> fields);
  void check_cpu(const Tensor& t, const char* op, const char* arg) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  MpiCommunicatorOptions options_;
};

}  // namespace loom

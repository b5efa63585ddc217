// NcclCommunicator: the Communicator backend for CUDA tensors, over one NCCL
// communicator per group, bootstrapped through the group's MPI communicator
// (rank 0 makes the unique id, MPI_Bcast shares it, every rank joins with
// ncclCommInitRank on its GPU).
//
// Ordering (DESIGN.md §3): every collective runs on the communicator's own
// stream. It first waits for an event recorded on the caller's stream (so it
// sees the caller's writes), and the caller's stream then waits for an event
// recorded after the collective (so later work, and stream-ordered frees of
// the buffers, come after it). No call blocks the host except barrier().
// all_reduce_async returns a Work whose wait() only makes the caller's stream
// wait (stream-ordered, no host sync); is_completed() polls the event.
//
// send_recv, all_to_all and all_to_all_v are grouped NCCL send/recv calls
// (ncclGroupStart/End), so the exchanges of one call progress together and
// cannot deadlock. Reductions support f64, f32, bf16, f16, i64, i32, u8
// (avg through ncclAvg). Tensors must be contiguous and on this GPU.
#pragma once

#include <memory>
#include <string>

#include "framework/stream.h"
#include "parallel/communicator.h"

namespace loom {

class MpiCommunicator;

// Whether this build has the NCCL backend (CUDA build with NCCL found).
bool nccl_available();

class NcclCommunicator : public Communicator {
 public:
  // Collective over `bootstrap` (every rank of its group calls it with its own GPU).
  NcclCommunicator(const MpiCommunicator& bootstrap, Device device);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const { return device_; }
  // The stream the collectives run on.
  Stream& comm_stream() { return *comm_stream_; }

  void all_reduce(Tensor& tensor, ReduceOp op, Stream& stream) override;
  void all_gather(Tensor& out, const Tensor& in, Stream& stream) override;
  void reduce_scatter(Tensor& out, const Tensor& in, ReduceOp op, Stream& stream) override;
  void broadcast(Tensor& tensor, int root, Stream& stream) override;
  void send(const Tensor& tensor, int dst, Stream& stream) override;
  void recv(Tensor& tensor, int src, Stream& stream) override;
  void send_recv(const Tensor& send_tensor, int dst, Tensor& recv_tensor, int src, Stream& stream) override;
  void all_to_all(Tensor& out, const Tensor& in, Stream& stream) override;
  // Waits for the communication stream and for every rank of the group (host sync, by definition).
  void barrier() override;
  std::unique_ptr<Work> all_reduce_async(Tensor& tensor, ReduceOp op, Stream& stream) override;
  void all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                    const std::vector<int64_t>& in_splits, Stream& stream) override;

 private:
  struct Impl;
  void check_tensor(const Tensor& t, const char* op, const char* arg) const;
  // Orders the communication stream after the caller's stream.
  void enter(Stream& caller);
  // Orders the caller's stream after everything queued on the communication stream.
  void leave(Stream& caller);

  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  Device device_;
  std::unique_ptr<Stream> comm_stream_;
  std::unique_ptr<Impl> impl_;
  const MpiCommunicator* bootstrap_ = nullptr;  // for barrier()
};

}  // namespace loom

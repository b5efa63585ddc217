// Communication accounting for sequence parallelism: a CountingCommunicator
// wraps a group's communicator and adds the bytes this rank sends to a named
// counter ("L", "S", "moe", ...), so the trainer can log bytes per step per
// layer type (metrics.jsonl "comm_bytes") and tests can check how traffic
// scales with T. Counting at the communicator boundary sees every byte of
// every algorithm (LASP-2, ring, all-gather, loss statistics) without each
// one reporting its own.
//
// Bytes sent per rank, for a group of P ranks and a message of n bytes:
//   send / send_recv: n sent;  all_gather (n per rank in): (P-1)·n;
//   reduce_scatter (n in): (P-1)/P·n;  all_reduce: 2·(P-1)/P·n (ring);
//   broadcast: n on the root, 0 elsewhere;  all_to_all (n in): (P-1)/P·n;
//   all_to_all_v: the rows sent to other ranks.
// These are the algorithmic volumes (what a bandwidth-optimal ring moves), the
// same on every backend, so numbers compare across runs and machines.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace loom {

class CountingCommunicator : public Communicator {
 public:
  // `inner` and `counter` must outlive this object.
  CountingCommunicator(Communicator& inner, double& counter) : inner_(inner), counter_(counter) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const std::string& name() const override { return inner_.name(); }
  void all_reduce(Tensor& tensor, ReduceOp op, Stream& stream) override;
  void all_gather(Tensor& out, const Tensor& in, Stream& stream) override;
  void reduce_scatter(Tensor& out, const Tensor& in, ReduceOp op, Stream& stream) override;
  void broadcast(Tensor& tensor, int root, Stream& stream) override;
  void send(const Tensor& tensor, int dst, Stream& stream) override;
  void recv(Tensor& tensor, int src, Stream& stream) override;
  void send_recv(const Tensor& send_tensor, int dst, Tensor& recv_tensor, int src, Stream& stream) override;
  void all_to_all(Tensor& out, const Tensor& in, Stream& stream) override;
  void barrier() override { inner_.barrier(); }
  std::unique_ptr<Work> all_reduce_async(Tensor& tensor, ReduceOp op, Stream& stream) override;
  void all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                    const std::vector<int64_t>& in_splits, Stream& stream) override;

 private:
  Communicator& inner_;
  double& counter_;
};

// Named byte counters over one group, each with its counting communicator.
class CommStats {
 public:
  explicit CommStats(Communicator& group) : group_(group) {}
  CommStats(const CommStats&) = delete;
  CommStats& operator=(const CommStats&) = delete;

  // The group's communicator counting into `key` (created on first use; stays valid).
  Communicator& counted(const std::string& key);
  // Bytes sent since the last reset, per key (keys used at least once).
  std::map<std::string, double> bytes() const;
  double bytes(const std::string& key) const;
  void reset();

 private:
  Communicator& group_;
  std::map<std::string, std::unique_ptr<double>> counters_;
  std::map<std::string, std::unique_ptr<CountingCommunicator>> comms_;
};

}  // namespace loom

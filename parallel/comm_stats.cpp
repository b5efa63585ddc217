// CountingCommunicator and CommStats (see comm_stats.h): forward every call,
// add this rank's algorithmic send volume to the counter.
#include "parallel/comm_stats.h"

#include <numeric>

namespace loom {
namespace {
double share(const Communicator& c, double bytes) {
  const double p = c.size();
  return (p - 1) / p * bytes;
}
}  // namespace

void CountingCommunicator::all_reduce(Tensor& tensor, ReduceOp op, Stream& stream) {
  counter_ += 2 * share(*this, static_cast<double>(tensor.nbytes()));
  inner_.all_reduce(tensor, op, stream);
}
void CountingCommunicator::all_gather(Tensor& out, const Tensor& in, Stream& stream) {
  counter_ += (size() - 1) * static_cast<double>(in.nbytes());
  inner_.all_gather(out, in, stream);
}
void CountingCommunicator::reduce_scatter(Tensor& out, const Tensor& in, ReduceOp op, Stream& stream) {
  counter_ += share(*this, static_cast<double>(in.nbytes()));
  inner_.reduce_scatter(out, in, op, stream);
}
void CountingCommunicator::broadcast(Tensor& tensor, int root, Stream& stream) {
  if (rank() == root) counter_ += static_cast<double>(tensor.nbytes());
  inner_.broadcast(tensor, root, stream);
}
void CountingCommunicator::send(const Tensor& tensor, int dst, Stream& stream) {
  counter_ += static_cast<double>(tensor.nbytes());
  inner_.send(tensor, dst, stream);
}
void CountingCommunicator::recv(Tensor& tensor, int src, Stream& stream) { inner_.recv(tensor, src, stream); }
void CountingCommunicator::send_recv(const Tensor& send_tensor, int dst, Tensor& recv_tensor, int src,
                                     Stream& stream) {
  counter_ += static_cast<double>(send_tensor.nbytes());
  inner_.send_recv(send_tensor, dst, recv_tensor, src, stream);
}
void CountingCommunicator::all_to_all(Tensor& out, const Tensor& in, Stream& stream) {
  counter_ += share(*this, static_cast<double>(in.nbytes()));
  inner_.all_to_all(out, in, stream);
}
std::unique_ptr<Work> CountingCommunicator::all_reduce_async(Tensor& tensor, ReduceOp op, Stream& stream) {
  counter_ += 2 * share(*this, static_cast<double>(tensor.nbytes()));
  return inner_.all_reduce_async(tensor, op, stream);
}
void CountingCommunicator::all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                                        const std::vector<int64_t>& in_splits, Stream& stream) {
  const int64_t rows = std::accumulate(in_splits.begin(), in_splits.end(), int64_t{0});
  if (rows > 0 && rank() < static_cast<int>(in_splits.size())) {
    const double row_bytes = static_cast<double>(in.nbytes()) / static_cast<double>(rows);
    counter_ += row_bytes * static_cast<double>(rows - in_splits[static_cast<size_t>(rank())]);
  }
  inner_.all_to_all_v(out, out_splits, in, in_splits, stream);
}

Communicator& CommStats::counted(const std::string& key) {
  auto it = comms_.find(key);
  if (it != comms_.end()) return *it->second;
  auto& counter = counters_[key];
  counter = std::make_unique<double>(0.0);
  auto& comm = comms_[key];
  comm = std::make_unique<CountingCommunicator>(group_, *counter);
  return *comm;
}

std::map<std::string, double> CommStats::bytes() const {
  std::map<std::string, double> out;
  for (const auto& [key, value] : counters_) out[key] = *value;
  return out;
}

double CommStats::bytes(const std::string& key) const {
  auto it = counters_.find(key);
  return it == counters_.end() ? 0.0 : *it->second;
}

void CommStats::reset() {
  for (auto& [key, value] : counters_) *value = 0;
}

}  // namespace loom

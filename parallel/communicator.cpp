// Communicator defaults (asynchronous all_reduce as a blocking one, all_to_all_v
// as send_recv rounds) and the argument checks every backend shares.
#include "parallel/communicator.h"

#include <numeric>

#include "parallel/collective_checks.h"

namespace loom {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::avg: return "avg";
    case ReduceOp::max: return "max";
    case ReduceOp::min: return "min";
  }
  return "unknown";
}

namespace {
// The result of a collective that already ran.
class CompletedWork : public Work {
 public:
  void wait() override {}
  bool is_completed() override { return true; }
};
}  // namespace

std::unique_ptr<Work> Communicator::all_reduce_async(Tensor& tensor, ReduceOp op, Stream& stream) {
  all_reduce(tensor, op, stream);
  return std::make_unique<CompletedWork>();
}

void Communicator::all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                                const std::vector<int64_t>& in_splits, Stream& stream) {
  detail::check_collective_tensor(*this, out, "all_to_all_v", "out");
  detail::check_collective_tensor(*this, in, "all_to_all_v", "in");
  detail::check_same_dtype(*this, out, in, "all_to_all_v");
  detail::check_splits(*this, in, in_splits, "in", "all_to_all_v");
  detail::check_splits(*this, out, out_splits, "out", "all_to_all_v");
  detail::check_row_shapes(*this, out, in, "all_to_all_v");
  const int p = size(), r = rank();
  std::vector<int64_t> in_start(p + 1, 0), out_start(p + 1, 0);
  std::partial_sum(in_splits.begin(), in_splits.end(), in_start.begin() + 1);
  std::partial_sum(out_splits.begin(), out_splits.end(), out_start.begin() + 1);
  // Round 0 is the local block; round s pairs (send to r + s, receive from r - s),
  // so every rank is in exactly one exchange per round and none can deadlock.
  LOOM_CHECK(in_splits[r] == out_splits[r]) << "all_to_all_v on group '" << name() << "': rank " << r << " sends "
                                            << in_splits[r] << " rows to itself but expects " << out_splits[r];
  Tensor own_out = out.narrow(0, out_start[r], out_splits[r]);
  own_out.copy_(in.narrow(0, in_start[r], in_splits[r]));
  for (int s = 1; s < p; ++s) {
    const int dst = (r + s) % p, src = (r - s + p) % p;
    Tensor recv_block = out.narrow(0, out_start[src], out_splits[src]);
    send_recv(in.narrow(0, in_start[dst], in_splits[dst]), dst, recv_block, src, stream);
  }
}

namespace detail {

namespace {
std::string group_str(const Communicator& comm) {
  return "group '" + comm.name() + "' (P = " + std::to_string(comm.size()) + ")";
}
}  // namespace

void check_collective_tensor(const Communicator& comm, const Tensor& t, const char* op, const char* arg) {
  LOOM_CHECK(t.defined()) << op << " on " << group_str(comm) << ": `" << arg << "` is an undefined tensor";
  LOOM_CHECK(t.is_contiguous()) << op << " on " << group_str(comm) << ": `" << arg << "` " << shape_str(t.shape())
                                << " with strides " << shape_str(t.strides())
                                << " is not contiguous (call contiguous() first)";
}

void check_same_dtype(const Communicator& comm, const Tensor& a, const Tensor& b, const char* op) {
  LOOM_CHECK(a.dtype() == b.dtype()) << op << " on " << group_str(comm) << ": dtypes differ (" << a.dtype()
                                     << " and " << b.dtype() << ")";
}

void check_block_shapes(const Communicator& comm, const Tensor& big, const char* big_name, const Tensor& small,
                        const char* small_name, const char* op) {
  Shape expected = small.shape();
  if (expected.empty()) {
    expected = {comm.size()};
  } else {
    expected[0] *= comm.size();
  }
  LOOM_CHECK(big.shape() == expected) << op << " on " << group_str(comm) << ": `" << big_name << "` "
                                      << shape_str(big.shape()) << " must be " << shape_str(expected) << " (P = "
                                      << comm.size() << " times dim 0 of `" << small_name << "` "
                                      << shape_str(small.shape()) << ")";
}

void check_peer(const Communicator& comm, int peer, const char* what, const char* op) {
  LOOM_CHECK(peer >= 0 && peer < comm.size()) << op << " on " << group_str(comm) << ": " << what << " rank " << peer
                                              << " is not in [0, " << comm.size() << ")";
}

void check_row_shapes(const Communicator& comm, const Tensor& out, const Tensor& in, const char* op) {
  LOOM_CHECK(out.dim() >= 1 && in.dim() >= 1 && Shape(out.shape().begin() + 1, out.shape().end()) ==
                                                     Shape(in.shape().begin() + 1, in.shape().end()))
      << op << " on " << group_str(comm) << ": rows of `out` " << shape_str(out.shape()) << " and `in` "
      << shape_str(in.shape()) << " differ after dim 0";
}

int64_t check_splits(const Communicator& comm, const Tensor& t, const std::vector<int64_t>& splits, const char* arg,
                     const char* op) {
  LOOM_CHECK(static_cast<int>(splits.size()) == comm.size())
      << op << " on " << group_str(comm) << ": " << splits.size() << " " << arg << "_splits for " << comm.size()
      << " ranks";
  LOOM_CHECK(t.dim() >= 1) << op << " on " << group_str(comm) << ": `" << arg << "` needs a dim 0 (got shape ())";
  int64_t total = 0;
  for (size_t i = 0; i < splits.size(); ++i) {
    LOOM_CHECK(splits[i] >= 0) << op << " on " << group_str(comm) << ": " << arg << "_splits[" << i
                               << "] = " << splits[i] << " is negative";
    total += splits[i];
  }
  LOOM_CHECK(total == t.size(0)) << op << " on " << group_str(comm) << ": " << arg << "_splits sum to " << total
                                 << " but `" << arg << "` " << shape_str(t.shape()) << " has " << t.size(0)
                                 << " rows";
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0);
}

}  // namespace detail
}  // namespace loom

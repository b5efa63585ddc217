// MpiCommunicator: collectives on CPU tensors through MPI. Checks come first
// (shape, dtype, device, contiguity; optionally consistency across ranks), then
// one MPI call on the tensors' memory; avg is a sum divided by P afterwards.
#include "parallel/mpi_communicator.h"

#include <climits>
#include <numeric>
#include <vector>

#include "parallel/collective_checks.h"
#include "parallel/mpi_check.h"

namespace loom {

namespace {

constexpr int kPointToPointTag = 0;  // pairs are ordered by MPI's non-overtaking rule
constexpr size_t kMaxConsistencyFields = 4;

int mpi_count(int64_t n, const char* op, const std::string& group) {
  LOOM_CHECK(n <= INT_MAX) << op << " on group '" << group << "': " << n
                           << " elements exceed MPI's int count limit (" << INT_MAX << "); split the tensor";
  return static_cast<int>(n);
}

// The MPI type that carries `dtype`'s bytes (16-bit floats as opaque words).
MPI_Datatype copy_type(DType dtype) {
  switch (dtype) {
    case DType::f64: return MPI_DOUBLE;
    case DType::f32: return MPI_FLOAT;
    case DType::bf16:
    case DType::f16: return MPI_UINT16_T;
    case DType::i64: return MPI_INT64_T;
    case DType::i32: return MPI_INT32_T;
    case DType::u8: return MPI_UINT8_T;
  }
  LOOM_FAIL() << "unknown dtype";
}

// The MPI type for arithmetic on `dtype`; throws for what MPI cannot reduce.
MPI_Datatype reduce_type(DType dtype, ReduceOp op, const char* what, const std::string& group) {
  LOOM_CHECK(dtype != DType::bf16 && dtype != DType::f16)
      << what << " on group '" << group << "': " << reduce_op_name(op) << " reduction of " << dtype
      << " is not supported by the MPI backend (use f32 or f64 on CPU)";
  LOOM_CHECK(op != ReduceOp::avg || is_floating(dtype))
      << what << " on group '" << group << "': avg needs a floating dtype (f32, f64), got " << dtype
      << " (use sum and divide)";
  return copy_type(dtype);
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::avg: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  LOOM_FAIL() << "unknown ReduceOp";
}

// avg = sum / P, computed the same way on every rank (so results stay bitwise equal).
void divide_in_place(Tensor& t, int divisor) {
  LOOM_DISPATCH_FLOAT(t.dtype(), scalar_t, [&] {
    scalar_t* data = t.data<scalar_t>();
    const scalar_t d = static_cast<scalar_t>(divisor);
    for (int64_t i = 0, n = t.numel(); i < n; ++i) data[i] /= d;
  });
}

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

// An MPI_Iallreduce in flight; holds the tensor so its memory outlives the transfer.
class MpiWork : public Work {
 public:
  MpiWork(MPI_Request request, Tensor tensor, int average_over)
      : request_(request), tensor_(std::move(tensor)), average_over_(average_over) {}
  ~MpiWork() override {
    // A transfer must not outlive its buffer: wait (errors cannot be thrown here).
    if (!done_ && !mpi_finalized()) MPI_Wait(&request_, MPI_STATUS_IGNORE);
  }
  void wait() override {
    if (done_) return;
    LOOM_MPI_CHECK(MPI_Wait(&request_, MPI_STATUS_IGNORE)) << "waiting for an all_reduce_async";
    complete();
  }
  bool is_completed() override {
    if (done_) return true;
    int flag = 0;
    LOOM_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE)) << "testing an all_reduce_async";
    if (flag) complete();
    return done_;
  }

 private:
  void complete() {
    done_ = true;
    if (average_over_ > 0) divide_in_place(tensor_, average_over_);
    tensor_ = Tensor();
  }
  MPI_Request request_;
  Tensor tensor_;
  int average_over_;  // > 0: divide by it once complete (avg)
  bool done_ = false;
};

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, MpiCommunicatorOptions options)
    : name_(std::move(name)), options_(options) {
  LOOM_CHECK(comm != MPI_COMM_NULL) << "MpiCommunicator '" << name_ << "' from MPI_COMM_NULL";
  LOOM_MPI_CHECK(MPI_Comm_dup(comm, &comm_)) << "duplicating the communicator for group '" << name_ << "'";
  LOOM_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  LOOM_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  LOOM_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::MpiCommunicator(Adopt, MPI_Comm comm, std::string name, MpiCommunicatorOptions options)
    : comm_(comm), name_(std::move(name)), options_(options) {
  LOOM_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  LOOM_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  LOOM_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ != MPI_COMM_NULL && !mpi_finalized()) MPI_Comm_free(&comm_);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split(int color, int key, std::string name) const {
  MPI_Comm sub = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub))
      << "splitting group '" << name_ << "' into '" << name << "' (color " << color << ", key " << key << ")";
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(Adopt{}, sub, std::move(name), options_));
}

void MpiCommunicator::check_cpu(const Tensor& t, const char* op, const char* arg) const {
  detail::check_collective_tensor(*this, t, op, arg);
  LOOM_CHECK(t.device().is_cpu()) << op << " on group '" << name_ << "': `" << arg << "` is on " << t.device()
                                  << "; the MPI backend takes CPU tensors (CUDA tensors go through NCCL)";
}

void MpiCommunicator::check_consistent(const char* op, std::initializer_list<std::pair<const char*, int64_t>> fields) {
  if (!options_.check_consistency || size_ == 1) return;
  // max over [fields, -fields] gives every rank the group's max and min at once.
  // The message has one fixed length, so ranks in different collectives still match.
  constexpr size_t n = kMaxConsistencyFields;
  LOOM_CHECK(fields.size() <= n) << "too many consistency fields for " << op;
  std::vector<int64_t> values(2 * n, 0);
  size_t i = 0;
  for (const auto& [field, value] : fields) {
    values[i] = value;
    values[n + i] = -value;
    ++i;
  }
  LOOM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, values.data(), mpi_count(2 * n, op, name_), MPI_INT64_T, MPI_MAX,
                               comm_))
      << "consistency check of " << op << " on group '" << name_ << "'";
  i = 0;
  for (const auto& [field, value] : fields) {
    const int64_t max = values[i], min = -values[n + i];
    LOOM_CHECK(min == max) << op << " on group '" << name_ << "' (P = " << size_ << "): ranks disagree on " << field
                           << ": min " << min << ", max " << max << " (rank " << rank_ << " has " << value << ")";
    ++i;
  }
}

void MpiCommunicator::all_reduce(Tensor& tensor, ReduceOp op, Stream& /*stream: MPI completes here*/) {
  check_cpu(tensor, "all_reduce", "tensor");
  MPI_Datatype type = reduce_type(tensor.dtype(), op, "all_reduce", name_);
  check_consistent("all_reduce", {{"collective", 1},
                                  {"op", static_cast<int64_t>(op)},
                                  {"dtype", static_cast<int64_t>(tensor.dtype())},
                                  {"numel", tensor.numel()}});
  if (size_ == 1) return;  // sum/avg/max/min of one value
  LOOM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, tensor.raw_data(), mpi_count(tensor.numel(), "all_reduce", name_), type,
                               mpi_op(op), comm_))
      << "all_reduce " << reduce_op_name(op) << " of " << shape_str(tensor.shape()) << " " << tensor.dtype()
      << " on group '" << name_ << "'";
  if (op == ReduceOp::avg) divide_in_place(tensor, size_);
}

std::unique_ptr<Work> MpiCommunicator::all_reduce_async(Tensor& tensor, ReduceOp op, Stream& /*stream*/) {
  check_cpu(tensor, "all_reduce_async", "tensor");
  MPI_Datatype type = reduce_type(tensor.dtype(), op, "all_reduce_async", name_);
  check_consistent("all_reduce_async", {{"collective", 1},
                                        {"op", static_cast<int64_t>(op)},
                                        {"dtype", static_cast<int64_t>(tensor.dtype())},
                                        {"numel", tensor.numel()}});
  MPI_Request request = MPI_REQUEST_NULL;
  LOOM_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, tensor.raw_data(),
                                mpi_count(tensor.numel(), "all_reduce_async", name_), type, mpi_op(op), comm_,
                                &request))
      << "all_reduce_async " << reduce_op_name(op) << " of " << shape_str(tensor.shape()) << " " << tensor.dtype()
      << " on group '" << name_ << "'";
  return std::make_unique<MpiWork>(request, tensor, op == ReduceOp::avg && size_ > 1 ? size_ : 0);
}

void MpiCommunicator::all_gather(Tensor& out, const Tensor& in, Stream& /*stream*/) {
  check_cpu(out, "all_gather", "out");
  check_cpu(in, "all_gather", "in");
  detail::check_same_dtype(*this, out, in, "all_gather");
  detail::check_block_shapes(*this, out, "out", in, "in", "all_gather");
  check_consistent("all_gather",
                   {{"collective", 2}, {"dtype", static_cast<int64_t>(in.dtype())}, {"in numel", in.numel()}});
  const int count = mpi_count(in.numel(), "all_gather", name_);
  LOOM_MPI_CHECK(MPI_Allgather(in.raw_data(), count, copy_type(in.dtype()), out.raw_data(), count,
                               copy_type(out.dtype()), comm_))
      << "all_gather of " << shape_str(in.shape()) << " " << in.dtype() << " on group '" << name_ << "'";
}

void MpiCommunicator::reduce_scatter(Tensor& out, const Tensor& in, ReduceOp op, Stream& /*stream*/) {
  check_cpu(out, "reduce_scatter", "out");
  check_cpu(in, "reduce_scatter", "in");
  detail::check_same_dtype(*this, out, in, "reduce_scatter");
  detail::check_block_shapes(*this, in, "in", out, "out", "reduce_scatter");
  MPI_Datatype type = reduce_type(in.dtype(), op, "reduce_scatter", name_);
  check_consistent("reduce_scatter", {{"collective", 3},
                                      {"op", static_cast<int64_t>(op)},
                                      {"dtype", static_cast<int64_t>(in.dtype())},
                                      {"in numel", in.numel()}});
  LOOM_MPI_CHECK(MPI_Reduce_scatter_block(in.raw_data(), out.raw_data(),
                                          mpi_count(out.numel(), "reduce_scatter", name_), type, mpi_op(op), comm_))
      << "reduce_scatter " << reduce_op_name(op) << " of " << shape_str(in.shape()) << " " << in.dtype()
      << " on group '" << name_ << "'";
  if (op == ReduceOp::avg && size_ > 1) divide_in_place(out, size_);
}

void MpiCommunicator::broadcast(Tensor& tensor, int root, Stream& /*stream*/) {
  check_cpu(tensor, "broadcast", "tensor");
  detail::check_peer(*this, root, "root", "broadcast");
  check_consistent("broadcast", {{"collective", 4},
                                 {"root", root},
                                 {"dtype", static_cast<int64_t>(tensor.dtype())},
                                 {"numel", tensor.numel()}});
  LOOM_MPI_CHECK(MPI_Bcast(tensor.raw_data(), mpi_count(tensor.numel(), "broadcast", name_),
                           copy_type(tensor.dtype()), root, comm_))
      << "broadcast of " << shape_str(tensor.shape()) << " " << tensor.dtype() << " from root " << root
      << " on group '" << name_ << "'";
}

void MpiCommunicator::send(const Tensor& tensor, int dst, Stream& /*stream*/) {
  check_cpu(tensor, "send", "tensor");
  detail::check_peer(*this, dst, "destination", "send");
  LOOM_MPI_CHECK(MPI_Send(tensor.raw_data(), mpi_count(tensor.numel(), "send", name_), copy_type(tensor.dtype()),
                          dst, kPointToPointTag, comm_))
      << "send of " << shape_str(tensor.shape()) << " " << tensor.dtype() << " to rank " << dst << " on group '"
      << name_ << "'";
}

namespace {
// A receive must fill the whole tensor: a shorter message is a size mismatch
// between the ranks (a longer one fails in MPI with MPI_ERR_TRUNCATE).
void check_received(const MPI_Status& status, const Tensor& tensor, int src, const char* op,
                    const std::string& group) {
  int received = 0;
  LOOM_MPI_CHECK(MPI_Get_count(&status, copy_type(tensor.dtype()), &received));
  LOOM_CHECK(received == tensor.numel()) << op << " on group '" << group << "': received " << received
                                         << " elements from rank " << src << " but the " << shape_str(tensor.shape())
                                         << " " << tensor.dtype() << " tensor expects " << tensor.numel();
}
}  // namespace

void MpiCommunicator::recv(Tensor& tensor, int src, Stream& /*stream*/) {
  check_cpu(tensor, "recv", "tensor");
  detail::check_peer(*this, src, "source", "recv");
  MPI_Status status;
  LOOM_MPI_CHECK(MPI_Recv(tensor.raw_data(), mpi_count(tensor.numel(), "recv", name_), copy_type(tensor.dtype()),
                          src, kPointToPointTag, comm_, &status))
      << "recv of " << shape_str(tensor.shape()) << " " << tensor.dtype() << " from rank " << src << " on group '"
      << name_ << "' (is the sender's tensor larger?)";
  check_received(status, tensor, src, "recv", name_);
}

void MpiCommunicator::send_recv(const Tensor& send_tensor, int dst, Tensor& recv_tensor, int src,
                                Stream& /*stream*/) {
  check_cpu(send_tensor, "send_recv", "send_tensor");
  check_cpu(recv_tensor, "send_recv", "recv_tensor");
  detail::check_peer(*this, dst, "destination", "send_recv");
  detail::check_peer(*this, src, "source", "send_recv");
  MPI_Status status;
  LOOM_MPI_CHECK(MPI_Sendrecv(send_tensor.raw_data(), mpi_count(send_tensor.numel(), "send_recv", name_),
                              copy_type(send_tensor.dtype()), dst, kPointToPointTag, recv_tensor.raw_data(),
                              mpi_count(recv_tensor.numel(), "send_recv", name_), copy_type(recv_tensor.dtype()),
                              src, kPointToPointTag, comm_, &status))
      << "send_recv on group '" << name_ << "': send " << shape_str(send_tensor.shape()) << " to rank " << dst
      << ", receive " << shape_str(recv_tensor.shape()) << " from rank " << src
      << " (is the sender's tensor larger?)";
  check_received(status, recv_tensor, src, "send_recv", name_);
}

void MpiCommunicator::all_to_all(Tensor& out, const Tensor& in, Stream& /*stream*/) {
  check_cpu(out, "all_to_all", "out");
  check_cpu(in, "all_to_all", "in");
  detail::check_same_dtype(*this, out, in, "all_to_all");
  LOOM_CHECK(in.dim() >= 1 && in.size(0) % size_ == 0)
      << "all_to_all on group '" << name_ << "': dim 0 of `in` " << shape_str(in.shape())
      << " must be a multiple of P = " << size_;
  LOOM_CHECK(out.shape() == in.shape()) << "all_to_all on group '" << name_ << "': `out` " << shape_str(out.shape())
                                        << " must have the shape of `in` " << shape_str(in.shape());
  check_consistent("all_to_all",
                   {{"collective", 5}, {"dtype", static_cast<int64_t>(in.dtype())}, {"numel", in.numel()}});
  const int block = mpi_count(in.numel() / size_, "all_to_all", name_);
  LOOM_MPI_CHECK(MPI_Alltoall(in.raw_data(), block, copy_type(in.dtype()), out.raw_data(), block,
                              copy_type(out.dtype()), comm_))
      << "all_to_all of " << shape_str(in.shape()) << " " << in.dtype() << " on group '" << name_ << "'";
}

void MpiCommunicator::all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                                   const std::vector<int64_t>& in_splits, Stream& /*stream*/) {
  check_cpu(out, "all_to_all_v", "out");
  check_cpu(in, "all_to_all_v", "in");
  detail::check_same_dtype(*this, out, in, "all_to_all_v");
  detail::check_splits(*this, in, in_splits, "in", "all_to_all_v");
  detail::check_splits(*this, out, out_splits, "out", "all_to_all_v");
  detail::check_row_shapes(*this, out, in, "all_to_all_v");
  const int64_t row_elements = shape_numel(Shape(in.shape().begin() + 1, in.shape().end()));
  check_consistent("all_to_all_v", {{"collective", 6},
                                    {"dtype", static_cast<int64_t>(in.dtype())},
                                    {"row elements", row_elements}});
  if (options_.check_consistency && size_ > 1) {
    // What each peer says it sends here must match what this rank expects; the
    // verdict is shared so that every rank throws, not only the one that sees it.
    std::vector<int64_t> incoming(size_);
    LOOM_MPI_CHECK(MPI_Alltoall(in_splits.data(), 1, MPI_INT64_T, incoming.data(), 1, MPI_INT64_T, comm_));
    std::string mismatch;
    for (int r = 0; r < size_ && mismatch.empty(); ++r) {
      if (incoming[r] != out_splits[r]) {
        mismatch = "rank " + std::to_string(r) + " sends " + std::to_string(incoming[r]) + " rows to rank " +
                   std::to_string(rank_) + ", which expects " + std::to_string(out_splits[r]) + " (out_splits[" +
                   std::to_string(r) + "])";
      }
    }
    int first_bad = mismatch.empty() ? -1 : rank_;
    LOOM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &first_bad, 1, MPI_INT, MPI_MAX, comm_));
    LOOM_CHECK(first_bad < 0) << "all_to_all_v on group '" << name_ << "': "
                              << (mismatch.empty() ? "the splits of rank " + std::to_string(first_bad) +
                                                         " disagree with what its peers send"
                                                   : mismatch);
  }
  std::vector<int> send_counts(size_), send_displs(size_), recv_counts(size_), recv_displs(size_);
  int64_t send_at = 0, recv_at = 0;
  for (int r = 0; r < size_; ++r) {
    send_counts[r] = mpi_count(in_splits[r] * row_elements, "all_to_all_v", name_);
    recv_counts[r] = mpi_count(out_splits[r] * row_elements, "all_to_all_v", name_);
    send_displs[r] = mpi_count(send_at, "all_to_all_v", name_);
    recv_displs[r] = mpi_count(recv_at, "all_to_all_v", name_);
    send_at += send_counts[r];
    recv_at += recv_counts[r];
  }
  LOOM_MPI_CHECK(MPI_Alltoallv(in.raw_data(), send_counts.data(), send_displs.data(), copy_type(in.dtype()),
                               out.raw_data(), recv_counts.data(), recv_displs.data(), copy_type(out.dtype()), comm_))
      << "all_to_all_v of " << shape_str(in.shape()) << " -> " << shape_str(out.shape()) << " " << in.dtype()
      << " on group '" << name_ << "'";
}

void MpiCommunicator::barrier() {
  check_consistent("barrier", {{"collective", 7}});
  LOOM_MPI_CHECK(MPI_Barrier(comm_)) << "barrier on group '" << name_ << "'";
}

}  // namespace loom

// NcclCommunicator (see nccl_communicator.h): MPI bootstrap, event ordering
// between the caller's stream and the communication stream, and one NCCL call
// (or one NCCL group of send/recv calls) per collective.
#include "parallel/cuda/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <numeric>

#include "framework/cuda_check.h"
#include "framework/cuda_runtime.h"
#include "parallel/collective_checks.h"
#include "parallel/mpi_check.h"
#include "parallel/mpi_communicator.h"

#define LOOM_NCCL_CHECK(call) LOOM_CHECK_STATUS(call, ncclSuccess, ncclGetErrorString)

namespace loom {

bool nccl_available() { return true; }

namespace {

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::f64: return ncclFloat64;
    case DType::f32: return ncclFloat32;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i64: return ncclInt64;
    case DType::i32: return ncclInt32;
    case DType::u8: return ncclUint8;
  }
  LOOM_FAIL() << "NCCL: unknown dtype";
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::avg: return ncclAvg;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  LOOM_FAIL() << "NCCL: unknown reduce op";
}

cudaStream_t raw(Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

// Keeps a collective's tensors alive until the caller's stream has been
// ordered after it; wait() orders the caller's stream (no host sync).
class NcclWork : public Work {
 public:
  NcclWork(std::unique_ptr<Event> done, Stream& caller, Tensor tensor)
      : done_(std::move(done)), caller_(caller), tensor_(std::move(tensor)) {}
  ~NcclWork() override {
    try {
      wait();
    } catch (...) {
    }
  }
  void wait() override {
    if (waited_) return;
    done_->wait(caller_);
    waited_ = true;
    tensor_ = Tensor();  // the caller's stream now frees it after the collective
  }
  bool is_completed() override { return done_->query(); }

 private:
  std::unique_ptr<Event> done_;
  Stream& caller_;
  Tensor tensor_;
  bool waited_ = false;
};

}  // namespace

struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;
  std::unique_ptr<Event> ready;  // recorded on the caller's stream
  std::unique_ptr<Event> done;   // recorded on the communication stream
};

NcclCommunicator::NcclCommunicator(const MpiCommunicator& bootstrap, Device device)
    : name_(bootstrap.name()), rank_(bootstrap.rank()), size_(bootstrap.size()), device_(device),
      impl_(std::make_unique<Impl>()), bootstrap_(&bootstrap) {
  LOOM_CHECK(device.is_cuda()) << "NcclCommunicator for group '" << name_ << "' needs a CUDA device, got " << device;
  cuda_rt::set_current_device(device.index);
  ncclUniqueId id;
  if (rank_ == 0) LOOM_NCCL_CHECK(ncclGetUniqueId(&id)) << "group '" << name_ << "'";
  LOOM_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, bootstrap.comm())) << "NCCL id for group '" << name_ << "'";
  LOOM_NCCL_CHECK(ncclCommInitRank(&impl_->comm, size_, id, rank_))
      << "group '" << name_ << "', rank " << rank_ << " of " << size_ << " on " << device;
  comm_stream_ = std::make_unique<Stream>(device);
  impl_->ready = std::make_unique<Event>(device);
  impl_->done = std::make_unique<Event>(device);
}

NcclCommunicator::~NcclCommunicator() {
  if (impl_ && impl_->comm != nullptr) {
    try {
      comm_stream_->synchronize();
    } catch (...) {
    }
    ncclCommDestroy(impl_->comm);
  }
}

void NcclCommunicator::check_tensor(const Tensor& t, const char* op, const char* arg) const {
  detail::check_collective_tensor(*this, t, op, arg);
  LOOM_CHECK(t.device() == device_) << op << " on group '" << name_ << "' (NCCL on " << device_ << "): `" << arg
                                    << "` is on " << t.device();
}

void NcclCommunicator::enter(Stream& caller) {
  LOOM_CHECK(caller.device() == device_) << "NCCL group '" << name_ << "' on " << device_ << " called with a stream of "
                                         << caller.device();
  impl_->ready->record(caller);
  impl_->ready->wait(*comm_stream_);
}

void NcclCommunicator::leave(Stream& caller) {
  impl_->done->record(*comm_stream_);
  impl_->done->wait(caller);
}

void NcclCommunicator::all_reduce(Tensor& tensor, ReduceOp op, Stream& stream) {
  check_tensor(tensor, "all_reduce", "tensor");
  enter(stream);
  LOOM_NCCL_CHECK(ncclAllReduce(tensor.raw_data(), tensor.raw_data(), tensor.numel(), nccl_type(tensor.dtype()),
                                nccl_op(op), impl_->comm, raw(*comm_stream_)))
      << "all_reduce of " << shape_str(tensor.shape()) << " on group '" << name_ << "'";
  leave(stream);
}

void NcclCommunicator::all_gather(Tensor& out, const Tensor& in, Stream& stream) {
  check_tensor(out, "all_gather", "out");
  check_tensor(in, "all_gather", "in");
  detail::check_same_dtype(*this, out, in, "all_gather");
  detail::check_block_shapes(*this, out, "out", in, "in", "all_gather");
  enter(stream);
  LOOM_NCCL_CHECK(ncclAllGather(in.raw_data(), out.raw_data(), in.numel(), nccl_type(in.dtype()), impl_->comm,
                                raw(*comm_stream_)))
      << "all_gather on group '" << name_ << "'";
  leave(stream);
}

void NcclCommunicator::reduce_scatter(Tensor& out, const Tensor& in, ReduceOp op, Stream& stream) {
  check_tensor(out, "reduce_scatter", "out");
  check_tensor(in, "reduce_scatter", "in");
  detail::check_same_dtype(*this, out, in, "reduce_scatter");
  detail::check_block_shapes(*this, in, "in", out, "out", "reduce_scatter");
  enter(stream);
  LOOM_NCCL_CHECK(ncclReduceScatter(in.raw_data(), out.raw_data(), out.numel(), nccl_type(in.dtype()), nccl_op(op),
                                    impl_->comm, raw(*comm_stream_)))
      << "reduce_scatter on group '" << name_ << "'";
  leave(stream);
}

void NcclCommunicator::broadcast(Tensor& tensor, int root, Stream& stream) {
  check_tensor(tensor, "broadcast", "tensor");
  detail::check_peer(*this, root, "root", "broadcast");
  enter(stream);
  LOOM_NCCL_CHECK(ncclBroadcast(tensor.raw_data(), tensor.raw_data(), tensor.numel(), nccl_type(tensor.dtype()), root,
                                impl_->comm, raw(*comm_stream_)))
      << "broadcast on group '" << name_ << "'";
  leave(stream);
}

void NcclCommunicator::send(const Tensor& tensor, int dst, Stream& stream) {
  check_tensor(tensor, "send", "tensor");
  detail::check_peer(*this, dst, "destination", "send");
  enter(stream);
  LOOM_NCCL_CHECK(ncclSend(tensor.raw_data(), tensor.numel(), nccl_type(tensor.dtype()), dst, impl_->comm,
                           raw(*comm_stream_)))
      << "send to rank " << dst << " on group '" << name_ << "'";
  leave(stream);
}

void NcclCommunicator::recv(Tensor& tensor, int src, Stream& stream) {
  check_tensor(tensor, "recv", "tensor");
  detail::check_peer(*this, src, "source", "recv");
  enter(stream);
  LOOM_NCCL_CHECK(ncclRecv(tensor.raw_data(), tensor.numel(), nccl_type(tensor.dtype()), src, impl_->comm,
                           raw(*comm_stream_)))
      << "recv from rank " << src << " on group '" << name_ << "'";
  leave(stream);
}

void NcclCommunicator::send_recv(const Tensor& send_tensor, int dst, Tensor& recv_tensor, int src, Stream& stream) {
  check_tensor(send_tensor, "send_recv", "send_tensor");
  check_tensor(recv_tensor, "send_recv", "recv_tensor");
  detail::check_peer(*this, dst, "destination", "send_recv");
  detail::check_peer(*this, src, "source", "send_recv");
  enter(stream);
  cudaStream_t s = raw(*comm_stream_);
  LOOM_NCCL_CHECK(ncclGroupStart());
  LOOM_NCCL_CHECK(ncclSend(send_tensor.raw_data(), send_tensor.numel(), nccl_type(send_tensor.dtype()), dst,
                           impl_->comm, s));
  LOOM_NCCL_CHECK(ncclRecv(recv_tensor.raw_data(), recv_tensor.numel(), nccl_type(recv_tensor.dtype()), src,
                           impl_->comm, s));
  LOOM_NCCL_CHECK(ncclGroupEnd()) << "send_recv (to " << dst << ", from " << src << ") on group '" << name_ << "'";
  leave(stream);
}

void NcclCommunicator::all_to_all(Tensor& out, const Tensor& in, Stream& stream) {
  check_tensor(out, "all_to_all", "out");
  check_tensor(in, "all_to_all", "in");
  detail::check_same_dtype(*this, out, in, "all_to_all");
  LOOM_CHECK(out.shape() == in.shape() && in.dim() >= 1 && in.size(0) % size_ == 0)
      << "all_to_all on group '" << name_ << "' (P = " << size_ << "): `in` " << shape_str(in.shape())
      << " and `out` " << shape_str(out.shape()) << " must have one shape with dim 0 divisible by P";
  std::vector<int64_t> splits(size_, in.size(0) / size_);
  all_to_all_v(out, splits, in, splits, stream);
}

void NcclCommunicator::all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                                    const std::vector<int64_t>& in_splits, Stream& stream) {
  check_tensor(out, "all_to_all_v", "out");
  check_tensor(in, "all_to_all_v", "in");
  detail::check_same_dtype(*this, out, in, "all_to_all_v");
  const int64_t row = detail::check_splits(*this, in, in_splits, "in", "all_to_all_v");
  detail::check_splits(*this, out, out_splits, "out", "all_to_all_v");
  detail::check_row_shapes(*this, out, in, "all_to_all_v");
  const size_t elem = dtype_size(in.dtype());
  std::vector<int64_t> in_start(size_ + 1, 0), out_start(size_ + 1, 0);
  std::partial_sum(in_splits.begin(), in_splits.end(), in_start.begin() + 1);
  std::partial_sum(out_splits.begin(), out_splits.end(), out_start.begin() + 1);
  enter(stream);
  cudaStream_t s = raw(*comm_stream_);
  ncclDataType_t type = nccl_type(in.dtype());
  auto* in_bytes = static_cast<const char*>(in.raw_data());
  auto* out_bytes = static_cast<char*>(out.raw_data());
  LOOM_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < size_; ++r) {
    if (in_splits[r] > 0)
      LOOM_NCCL_CHECK(ncclSend(in_bytes + in_start[r] * row * elem, in_splits[r] * row, type, r, impl_->comm, s));
    if (out_splits[r] > 0)
      LOOM_NCCL_CHECK(ncclRecv(out_bytes + out_start[r] * row * elem, out_splits[r] * row, type, r, impl_->comm, s));
  }
  LOOM_NCCL_CHECK(ncclGroupEnd()) << "all_to_all_v on group '" << name_ << "'";
  leave(stream);
}

void NcclCommunicator::barrier() {
  comm_stream_->synchronize();
  LOOM_MPI_CHECK(MPI_Barrier(bootstrap_->comm())) << "barrier on group '" << name_ << "'";
}

std::unique_ptr<Work> NcclCommunicator::all_reduce_async(Tensor& tensor, ReduceOp op, Stream& stream) {
  check_tensor(tensor, "all_reduce_async", "tensor");
  enter(stream);
  LOOM_NCCL_CHECK(ncclAllReduce(tensor.raw_data(), tensor.raw_data(), tensor.numel(), nccl_type(tensor.dtype()),
                                nccl_op(op), impl_->comm, raw(*comm_stream_)))
      << "all_reduce_async of " << shape_str(tensor.shape()) << " on group '" << name_ << "'";
  auto done = std::make_unique<Event>(device_);
  done->record(*comm_stream_);
  return std::make_unique<NcclWork>(std::move(done), stream, tensor);
}

}  // namespace loom

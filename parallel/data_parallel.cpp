// GradReducer: bucketing, hook-driven asynchronous all-reduce, write-back; and
// broadcast_parameters.
#include "parallel/data_parallel.h"

#include <algorithm>
#include <set>
#include <sstream>

namespace loom {

namespace detail {

struct Bucket {
  std::vector<size_t> params;    // indices into GradReducerState::params
  std::vector<int64_t> offsets;  // element offset of each parameter in `buffer`
  int64_t numel = 0;
  int64_t bytes = 0;
  Tensor buffer;                 // (numel) flat gradients; allocated when the group has > 1 rank
  int pending = 0;               // parameters not yet ready in this backward
  std::unique_ptr<Work> work;    // the reduction in flight
  bool launched = false;
};

struct GradReducerState {
  std::vector<Parameter> params;
  std::vector<size_t> bucket_of;  // parameter -> bucket
  std::vector<bool> ready;        // parameter's gradient complete in this backward
  std::vector<Bucket> buckets;    // in start order
  size_t next_to_launch = 0;      // buckets start strictly in order (same collective order on all ranks)
  Communicator* comm = nullptr;
  GradReducerOptions options;
  bool sync = true;

  bool single_rank() const { return comm->size() == 1; }

  void on_ready(size_t index) {
    if (!sync) return;
    LOOM_CHECK(!ready[index]) << "GradReducer: the gradient of '" << params[index].name
                              << "' became ready twice before finish(); call finish() after each synchronized "
                                 "backward and use set_sync(false) / NoSyncGuard for micro-batches before the last";
    ready[index] = true;
    --buckets[bucket_of[index]].pending;
    while (next_to_launch < buckets.size() && buckets[next_to_launch].pending == 0) launch(buckets[next_to_launch++]);
    // MPI progresses non-blocking collectives only inside MPI calls: poll those in flight.
    for (size_t b = 0; b < next_to_launch; ++b) {
      if (buckets[b].work) buckets[b].work->is_completed();
    }
  }

  void launch(Bucket& bucket) {
    bucket.launched = true;
    if (single_rank()) return;  // nothing to reduce; finish() only fills missing gradients
    for (size_t k = 0; k < bucket.params.size(); ++k) {
      const Variable& var = params[bucket.params[k]].var;
      Tensor slot = bucket.buffer.narrow(0, bucket.offsets[k], var.numel()).view(var.shape());
      const Tensor& grad = var.grad();
      if (grad.defined()) {
        check_same_shape(grad, var.data(), "GradReducer: gradient vs parameter");
        slot.copy_(grad);
      } else {
        slot.zero_();  // no gradient on this rank this time: contributes zeros
      }
    }
    bucket.work = comm->all_reduce_async(bucket.buffer, options.reduce_op, Stream::default_for(bucket.buffer.device()));
  }

  void finish() {
    if (!sync) return;
    while (next_to_launch < buckets.size()) launch(buckets[next_to_launch++]);
    for (Bucket& bucket : buckets) {
      if (bucket.work) bucket.work->wait();
      for (size_t k = 0; k < bucket.params.size(); ++k) {
        Variable& var = params[bucket.params[k]].var;
        if (single_rank()) {
          if (!var.grad().defined()) var.set_grad(Tensor::zeros(var.shape(), grad_buffer_dtype(var.dtype()), var.device()));
          continue;
        }
        Tensor slot = bucket.buffer.narrow(0, bucket.offsets[k], var.numel()).view(var.shape());
        if (var.grad().defined()) {
          Tensor grad = var.grad();  // shares storage: written in place
          grad.copy_(slot);
        } else {
          var.set_grad(slot.clone());  // own buffer, not a view of the bucket
        }
      }
      bucket.work.reset();
      bucket.launched = false;
      bucket.pending = static_cast<int>(bucket.params.size());
    }
    std::fill(ready.begin(), ready.end(), false);
    next_to_launch = 0;
  }
};

}  // namespace detail

GradReducer::GradReducer(std::vector<Parameter> params, Communicator& comm, GradReducerOptions options)
    : state_(std::make_shared<detail::GradReducerState>()) {
  LOOM_CHECK(options.bucket_bytes > 0) << "GradReducer: bucket_bytes must be positive, got " << options.bucket_bytes;
  detail::GradReducerState& s = *state_;
  s.comm = &comm;
  s.options = options;
  std::set<const VariableImpl*> seen;
  for (Parameter& p : params) {
    LOOM_CHECK(p.var.defined()) << "GradReducer: parameter '" << p.name << "' is undefined";
    if (!p.var.requires_grad() || !seen.insert(p.var.impl().get()).second) continue;
    s.params.push_back(std::move(p));
  }
  // Buckets in reverse registration order; a new bucket when the next parameter
  // would overflow this one, or has another dtype or device.
  s.bucket_of.resize(s.params.size());
  for (size_t i = s.params.size(); i-- > 0;) {
    const Variable& var = s.params[i].var;
    // Gradients live in the gradient-buffer dtype (fp32 for 16-bit parameters): reduce in that dtype.
    const int64_t bytes = var.numel() * static_cast<int64_t>(dtype_size(grad_buffer_dtype(var.dtype())));
    bool fresh = s.buckets.empty();
    if (!fresh) {
      const detail::Bucket& last = s.buckets.back();
      const Variable& first = s.params[last.params.front()].var;
      fresh = last.bytes + bytes > options.bucket_bytes || grad_buffer_dtype(first.dtype()) != grad_buffer_dtype(var.dtype()) ||
              first.device() != var.device();
    }
    if (fresh) s.buckets.emplace_back();
    detail::Bucket& bucket = s.buckets.back();
    bucket.params.push_back(i);
    bucket.offsets.push_back(bucket.numel);
    bucket.numel += var.numel();
    bucket.bytes += bytes;
    bucket.pending += 1;
    s.bucket_of[i] = s.buckets.size() - 1;
  }
  if (comm.size() > 1) {
    for (detail::Bucket& bucket : s.buckets) {
      const Variable& first = s.params[bucket.params.front()].var;
      bucket.buffer = Tensor::empty({bucket.numel}, grad_buffer_dtype(first.dtype()), first.device());  // (numel)
    }
  }
  s.ready.assign(s.params.size(), false);
  std::weak_ptr<detail::GradReducerState> weak = state_;
  for (size_t i = 0; i < s.params.size(); ++i) {
    s.params[i].var.register_grad_ready_hook([weak, i](const Tensor& /*grad: read from the parameter*/) {
      if (auto state = weak.lock()) state->on_ready(i);
    });
  }
}

GradReducer::~GradReducer() {
  // Transfers in flight must end before their buffers go (Work's destructor waits).
  for (detail::Bucket& bucket : state_->buckets) bucket.work.reset();
}

void GradReducer::set_sync(bool sync) { state_->sync = sync; }
bool GradReducer::sync() const { return state_->sync; }
void GradReducer::finish() { state_->finish(); }
int GradReducer::num_buckets() const { return static_cast<int>(state_->buckets.size()); }
int GradReducer::launched_buckets() const { return static_cast<int>(state_->next_to_launch); }

std::vector<std::vector<std::string>> GradReducer::bucket_names() const {
  std::vector<std::vector<std::string>> names;
  for (const detail::Bucket& bucket : state_->buckets) {
    names.emplace_back();
    for (size_t i : bucket.params) names.back().push_back(state_->params[i].name);
  }
  return names;
}

namespace {
// FNV-1a over the names, dtypes and shapes: equal lists give equal fingerprints.
int64_t parameter_fingerprint(const std::vector<Parameter>& params) {
  std::ostringstream text;
  for (const Parameter& p : params) text << p.name << ':' << p.var.dtype() << shape_str(p.var.shape()) << ';';
  uint64_t hash = 1469598103934665603ull;
  for (char c : text.str()) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 1099511628211ull;
  }
  return static_cast<int64_t>(hash >> 1);  // non-negative
}
}  // namespace

void broadcast_parameters(const std::vector<Parameter>& params, Communicator& comm, int root) {
  if (comm.size() == 1) return;
  Stream& cpu = Stream::default_for(Device::cpu());
  // Every rank learns whether the lists agree (max == min), so all throw together.
  const int64_t fingerprint = parameter_fingerprint(params);
  const int64_t count = static_cast<int64_t>(params.size());
  Tensor max = Tensor::from_vector<int64_t>({fingerprint, count}, {2});
  Tensor min = max.clone();
  comm.all_reduce(max, ReduceOp::max, cpu);
  comm.all_reduce(min, ReduceOp::min, cpu);
  const std::vector<int64_t> hi = max.to_vector<int64_t>(), lo = min.to_vector<int64_t>();
  LOOM_CHECK(hi == lo) << "broadcast_parameters on group '" << comm.name() << "': ranks hold different parameter lists"
                       << " (counts from " << lo[1] << " to " << hi[1] << "; this rank has " << count
                       << "; names, dtypes or shapes differ)";
  for (const Parameter& p : params) {
    const Tensor& data = p.var.data();
    Stream& stream = Stream::default_for(data.device());
    if (data.is_contiguous()) {
      Tensor t = data;
      comm.broadcast(t, root, stream);
    } else {
      Tensor t = data.contiguous();
      comm.broadcast(t, root, stream);
      Tensor target = data;
      target.copy_(t);
    }
  }
}

}  // namespace loom

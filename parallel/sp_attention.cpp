// Shared local pieces of the sequence-parallel attentions (see sp_attention.h).
// The attention and merge kernels (through kernels/dispatch.h) do the block
// math; this file decides which blocks to run, merges their partial (out, lse)
// exactly (kernels/cpu|cuda/attention_merge: lse = -inf is "no key yet", so an
// empty row never meets inf - inf) and routes their gradients. The running (out,
// lse) and the gradient accumulators are fp32 for 16-bit data (CUDA) and the
// data's own dtype otherwise (f32 or f64 on CPU), and the partials of each
// block are folded into them as they come.
#include "parallel/sp_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "framework/op_checks.h"
#include "kernels/dispatch.h"
#ifdef LOOM_WITH_NCCL
#include "parallel/cuda/nccl_communicator.h"
#endif

namespace loom {

namespace {

// A run of consecutive global positions, stored at rows [start, start + len).
struct PositionRun {
  int64_t start, len;
  int64_t first, last;  // positions of its first and last row
};

// Cuts `n` positions into runs of consecutive values, also at every multiple
// of `chunk` and of `block` where they are > 0 (so a run lies in one layout
// chunk and one S2 block).
std::vector<PositionRun> position_runs(const int64_t* pos, int64_t n, int64_t chunk, int64_t block) {
  auto cut_at = [&](int64_t p) { return (chunk > 0 && p % chunk == 0) || (block > 0 && p % block == 0); };
  std::vector<PositionRun> runs;
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && pos[j] == pos[j - 1] + 1 && !cut_at(pos[j])) ++j;
    runs.push_back({i, j - i, pos[i], pos[j - 1]});
    i = j;
  }
  return runs;
}

// Whether some (query, key) pair of the two runs is visible in some pattern.
// Under S2 both runs lie in one block each (position_runs cut them there);
// the test is written for a query run over several blocks all the same: the
// rule's strided part does not depend on the query block, and its local part
// favours the nearest one, so the first query block at or after the key
// block decides.
bool pair_needed(const PositionRun& query, const PositionRun& key, bool causal, const S2Pattern& s2,
                 int64_t num_patterns) {
  if (causal && key.first > query.last) return false;
  if (!s2.enabled()) return true;
  const int64_t kb = key.first / s2.block;
  const int64_t q_lo = query.first / s2.block, q_hi = query.last / s2.block;
  if (q_hi < kb) return false;
  const int64_t qb = std::max(q_lo, kb);
  for (int64_t pattern = 0; pattern < num_patterns; ++pattern)
    if (s2_block_active(qb, kb, pattern, num_patterns, s2)) return true;
  return false;
}

// Rows [start, start + len) of dim 1, contiguous (a view when B == 1).
Tensor rows_of(const Tensor& t, int64_t start, int64_t len) { return t.narrow(1, start, len).contiguous(); }
// Columns [start, start + len) of the last dim of a (B, H, T) statistic, contiguous.
Tensor cols_of(const Tensor& t, int64_t start, int64_t len) {
  return t.defined() ? t.narrow(2, start, len).contiguous() : Tensor();
}

// The keys, values and positions of a block's key ranges: views when there is
// one range (and B == 1), else gathered copies in range order.
struct BlockKeys {
  Tensor k, v;       // (B, k_len, Hkv, D) contiguous
  Tensor positions;  // (k_len) i64
};
BlockKeys gather_keys(const Tensor& k, const Tensor& v, const Tensor& positions, const std::vector<KeyRange>& keys) {
  if (keys.size() == 1) {
    const KeyRange& r = keys[0];
    return {rows_of(k, r.start, r.len), rows_of(v, r.start, r.len), positions.narrow(0, r.start, r.len)};
  }
  int64_t total = 0;
  for (const KeyRange& r : keys) total += r.len;
  Shape shape = k.shape();
  shape[1] = total;
  BlockKeys out{Tensor::empty(shape, k.dtype(), k.device()), Tensor::empty(shape, v.dtype(), v.device()),
                Tensor::empty({total}, DType::i64, positions.device())};
  int64_t at = 0;
  for (const KeyRange& r : keys) {
    out.k.narrow(1, at, r.len).copy_(k.narrow(1, r.start, r.len));
    out.v.narrow(1, at, r.len).copy_(v.narrow(1, r.start, r.len));
    out.positions.narrow(0, at, r.len).copy_(positions.narrow(0, r.start, r.len));
    at += r.len;
  }
  return out;
}

Tensor owned_positions(const Tensor& given, int64_t n, const char* op, const char* name) {
  LOOM_CHECK(given.device().is_cpu()) << op << ": " << name << " on " << given.device() << "; CPU positions needed";
  LOOM_CHECK(given.dtype() == DType::i64 || given.dtype() == DType::i32)
      << op << ": " << name << " must be i64 or i32, got " << given.dtype();
  LOOM_CHECK(given.dim() == 1 && given.size(0) == n)
      << op << ": " << name << " shape " << shape_str(given.shape()) << " must be " << shape_str({n})
      << " (the local tokens)";
  Tensor owned = Tensor::empty({n}, DType::i64);
  owned.copy_(given);
  return owned;
}

// Every cp rank's key positions on the host, in rank order, from each rank's
// own (T) host tensor. A communicator that carries CPU tensors (MPI, or a CUDA
// mesh's group, which routes them to MPI) gathers them on the host and nothing
// waits for the device. A bare NCCL communicator takes device tensors only:
// there the gather runs on the device and reading it back is a host sync,
// once, before the ring or the all-gather starts (never inside the ring).
std::vector<Tensor> gather_rank_positions(const Tensor& mine, Device device, Communicator& cp) {
  const int P = cp.size();
  const int64_t n = mine.numel();
  bool device_only = false;
#ifdef LOOM_WITH_NCCL
  device_only = dynamic_cast<NcclCommunicator*>(&cp) != nullptr;
#endif
  Tensor everyone;  // (P * n) i64 on the host
  if (device_only) {
    Tensor gathered = Tensor::empty({P * n}, DType::i64, device);  // (P * n)
    cp.all_gather(gathered, mine.to(device), Stream::default_for(device));
    everyone = gathered.to(Device::cpu());  // host sync (see above)
  } else {
    everyone = Tensor::empty({P * n}, DType::i64);
    cp.all_gather(everyone, mine, Stream::default_for(Device::cpu()));
  }
  std::vector<Tensor> positions;
  for (int r = 0; r < P; ++r) positions.push_back(everyone.narrow(0, r * n, n).contiguous());
  return positions;
}

}  // namespace

int64_t AttentionBlock::k_len() const {
  int64_t n = 0;
  for (const KeyRange& r : keys) n += r.len;
  return n;
}

std::vector<AttentionBlock> plan_attention_blocks(const Tensor& q_positions, const Tensor& k_positions, bool causal,
                                                  const S2Pattern& s2, int64_t num_patterns, int64_t chunk) {
  LOOM_CHECK(q_positions.dtype() == DType::i64 && q_positions.dim() == 1 && q_positions.is_contiguous() &&
             k_positions.dtype() == DType::i64 && k_positions.dim() == 1 && k_positions.is_contiguous())
      << "plan_attention_blocks: positions must be contiguous 1-D i64, got q " << shape_str(q_positions.shape())
      << " " << q_positions.dtype() << " and k " << shape_str(k_positions.shape()) << " " << k_positions.dtype();
  const int64_t Tq = q_positions.size(0), Tk = k_positions.size(0);
  std::vector<AttentionBlock> plan;
  if (Tq == 0 || Tk == 0) return plan;
  if (!causal && !s2.enabled()) return {AttentionBlock{0, Tq, {KeyRange{0, Tk}}, cpu::MaskForm::diagonal(Tk)}};

  const int64_t block = s2.enabled() ? s2.block : 0;
  const std::vector<PositionRun> q_runs = position_runs(q_positions.data<int64_t>(), Tq, chunk, block);
  const std::vector<PositionRun> k_runs = position_runs(k_positions.data<int64_t>(), Tk, chunk, block);
  for (const PositionRun& qr : q_runs) {
    std::vector<KeyRange> keys;
    for (const PositionRun& kr : k_runs) {
      if (!pair_needed(qr, kr, causal, s2, num_patterns)) continue;
      if (!keys.empty() && keys.back().start + keys.back().len == kr.start) keys.back().len += kr.len;
      else keys.push_back({kr.start, kr.len});
    }
    AttentionBlock* last = plan.empty() ? nullptr : &plan.back();
    if (last != nullptr && last->q_start + last->q_len == qr.start && last->keys == keys) {
      last->q_len += qr.len;  // same keys as the run before it: one block
    } else if (!keys.empty()) {
      plan.push_back({qr.start, qr.len, std::move(keys), cpu::MaskForm::positions()});
    }
  }
  if (!s2.enabled()) {
    const int64_t* qp = q_positions.data<int64_t>();
    const int64_t* kp = k_positions.data<int64_t>();
    for (AttentionBlock& blk : plan) {
      std::vector<int64_t> key_positions;  // the gathered keys' positions, in gather order
      for (const KeyRange& r : blk.keys) key_positions.insert(key_positions.end(), kp + r.start, kp + r.start + r.len);
      blk.form = cpu::mask_form(qp + blk.q_start, blk.q_len, key_positions.data(),
                                static_cast<int64_t>(key_positions.size()), causal);
    }
  }
  return plan;
}

namespace sp {

AttentionCall resolve_call(const char* op, const Variable& q, const Variable& k, const Variable& v,
                           const AttentionOptions& options, const TokenLayout& layout, Communicator& cp) {
  check_input(q, op, "q");
  check_input(k, op, "k");
  check_input(v, op, "v");
  LOOM_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4)
      << op << ": q " << shape_str(q.shape()) << " must be (B, T, H, D), k " << shape_str(k.shape()) << " and v "
      << shape_str(v.shape()) << " (B, T, Hkv, D)";
  LOOM_CHECK(k.shape() == v.shape()) << op << ": k shape " << shape_str(k.shape()) << " differs from v "
                                     << shape_str(v.shape());
  LOOM_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype())
      << op << ": dtypes differ: q " << q.dtype() << ", k " << k.dtype() << ", v " << v.dtype();
  LOOM_CHECK(k.device() == q.device() && v.device() == q.device())
      << op << ": q, k, v must share a device, got " << q.device() << ", " << k.device() << ", " << v.device();
  if (q.device().is_cuda()) {
    LOOM_CHECK(q.dtype() == DType::bf16 || q.dtype() == DType::f32)
        << op << ": dtype " << q.dtype() << " on " << q.device() << " is not supported (bf16, f32: the CUDA "
        << "attention kernels' types)";
  }
  AttentionCall call;
  call.device = q.device();
  call.dtype = q.dtype();
  call.acc_dtype = stats_dtype(q.dtype());
  call.B = q.size(0);
  call.T = q.size(1);
  call.H = q.size(2);
  call.D = q.size(3);
  call.Hkv = k.size(2);
  LOOM_CHECK(k.size(0) == call.B && k.size(1) == call.T && k.size(3) == call.D)
      << op << ": k " << shape_str(k.shape()) << " does not match q " << shape_str(q.shape())
      << " in batch, local tokens or head dim (the shards hold the same tokens)";
  LOOM_CHECK(call.Hkv > 0 && call.H % call.Hkv == 0)
      << op << ": H = " << call.H << " query heads is not a multiple of Hkv = " << call.Hkv << " kv heads";
  LOOM_CHECK(layout.cp_size() == cp.size()) << op << ": token layout is for cp = " << layout.cp_size()
                                            << " ranks but group '" << cp.name() << "' has " << cp.size();
  LOOM_CHECK(call.T == layout.local_len()) << op << ": q has " << call.T << " local tokens but the "
                                           << layout_kind_name(layout.kind()) << " layout of seq_len "
                                           << layout.seq_len() << " over cp = " << layout.cp_size() << " gives "
                                           << layout.local_len();
  call.scale = options.scale != 0.0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(call.D));
  LOOM_CHECK(std::isfinite(call.scale)) << op << ": scale = " << call.scale << " (D = " << call.D
                                        << ") is not finite";
  call.causal = options.causal;
  call.chunk = layout.chunks(cp.rank()).front().length;
  call.q_positions = options.q_positions.defined()
                         ? owned_positions(options.q_positions, call.T, op, "q_positions")
                         : layout.positions(cp.rank());
  call.k_positions = options.k_positions.defined() ? owned_positions(options.k_positions, call.T, op, "k_positions")
                                                   : call.q_positions.clone();
  call.s2 = options.s2;
  LOOM_CHECK(call.s2.block >= 0) << op << ": S2 block = " << call.s2.block << " must be >= 0 (0 = dense)";
  if (call.s2.enabled()) {
    LOOM_CHECK(call.causal) << op << ": S2 block sparsity (block = " << call.s2.block << ") needs causal attention";
    LOOM_CHECK(call.s2.local_blocks >= 1 && call.s2.vert_stride >= 1)
        << op << ": S2 local_blocks = " << call.s2.local_blocks << " and vert_stride = " << call.s2.vert_stride
        << " must be >= 1";
    for (const Tensor* pos : {&call.q_positions, &call.k_positions}) {
      const int64_t* p = pos->data<int64_t>();
      for (int64_t i = 0; i < pos->numel(); ++i)
        LOOM_CHECK(p[i] >= 0) << op << ": S2 needs non-negative positions, got " << p[i] << " at index " << i;
    }
  }
  call.q_positions_device = index_on(call.q_positions, call.device);
  if (call.device.is_cuda()) {
    if (!options.q_positions.defined() && !options.k_positions.defined()) {
      for (int r = 0; r < cp.size(); ++r) call.rank_k_positions.push_back(layout.positions(r));
    } else {
      call.rank_k_positions = gather_rank_positions(call.k_positions, call.device, cp);
    }
  }
  return call;
}

void attend_forward(Tensor& out_acc, Tensor& lse_acc, const Tensor& q, const Tensor& k, const Tensor& v,
                    const Tensor& q_positions, const Tensor& k_positions, const std::vector<AttentionBlock>& plan,
                    const AttentionCall& call, SpAttentionStats* stats, Stream& stream) {
  for (const AttentionBlock& blk : plan) {
    const BlockKeys keys = gather_keys(k, v, k_positions, blk.keys);  // (B, k_len, Hkv, D)
    Tensor q_blk = rows_of(q, blk.q_start, blk.q_len);  // (B, q_len, H, D)
    Tensor out = Tensor::empty({call.B, blk.q_len, call.H, call.D}, q.dtype(), q.device());  // (B, q_len, H, D)
    Tensor lse = Tensor::empty({call.B, call.H, blk.q_len}, call.acc_dtype, q.device());      // (B, H, q_len)
    dispatch::attention_forward(out, lse, q_blk, keys.k, keys.v, q_positions.narrow(0, blk.q_start, blk.q_len),
                                keys.positions, call.scale, call.causal, call.s2, stream, blk.form);
    dispatch::attention_merge(out_acc, lse_acc, out, lse, blk.q_start, stream);
    if (stats != nullptr) {
      stats->forward_blocks += 1;
      stats->forward_score_pairs += blk.q_len * keys.k.size(1);
    }
  }
}

void attend_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                     const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                     const Tensor& q_positions, const Tensor& k_positions, const std::vector<AttentionBlock>& plan,
                     const AttentionCall& call, SpAttentionStats* stats, Stream& stream) {
  for (const AttentionBlock& blk : plan) {
    const BlockKeys keys = gather_keys(k, v, k_positions, blk.keys);  // (B, k_len, Hkv, D)
    Tensor q_blk = rows_of(q, blk.q_start, blk.q_len);  // (B, q_len, H, D)
    // The block's gradients in the data's dtype (the kernels' contract), added into the accumulators.
    Tensor dq_blk = Tensor::empty(q_blk.shape(), q.dtype(), q.device());   // (B, q_len, H, D)
    Tensor dk_blk = Tensor::empty(keys.k.shape(), q.dtype(), q.device());  // (B, k_len, Hkv, D)
    Tensor dv_blk = Tensor::empty(keys.k.shape(), q.dtype(), q.device());
    dispatch::attention_backward(dq_blk, dk_blk, dv_blk,
                                 dout.defined() ? rows_of(dout, blk.q_start, blk.q_len) : Tensor(),
                                 cols_of(dlse, blk.q_start, blk.q_len), q_blk, keys.k, keys.v,
                                 rows_of(out, blk.q_start, blk.q_len), cols_of(lse, blk.q_start, blk.q_len),
                                 q_positions.narrow(0, blk.q_start, blk.q_len), keys.positions, call.scale,
                                 call.causal, call.s2, stream, blk.form);
    add_rows(dq, dq_blk, blk.q_start);
    int64_t at = 0;
    for (const KeyRange& r : blk.keys) {  // scatter the gathered keys' gradients back to their rows
      add_rows(dk, rows_of(dk_blk, at, r.len), r.start);
      add_rows(dv, rows_of(dv_blk, at, r.len), r.start);
      at += r.len;
    }
    if (stats != nullptr) {
      stats->backward_blocks += 1;
      stats->backward_score_pairs += blk.q_len * keys.k.size(1);
    }
  }
}

int PackedMessage::add(const Shape& shape, DType dtype) {
  parts_.push_back({shape, dtype, nbytes_});
  const int64_t bytes = shape_numel(shape) * static_cast<int64_t>(dtype_size(dtype));
  nbytes_ += (bytes + 7) / 8 * 8;
  return static_cast<int>(parts_.size()) - 1;
}

Tensor PackedMessage::allocate(Device device) const { return Tensor::empty({nbytes_}, DType::u8, device); }

Tensor PackedMessage::view(const Tensor& buffer, int part, int64_t base) const {
  LOOM_CHECK(part >= 0 && part < static_cast<int>(parts_.size())) << "PackedMessage: part " << part << " of "
                                                                  << parts_.size();
  LOOM_CHECK(buffer.dtype() == DType::u8 && buffer.is_contiguous() && base >= 0 && buffer.offset() % 8 == 0 &&
             base % 8 == 0 && base + nbytes_ <= buffer.numel())
      << "PackedMessage: buffer " << shape_str(buffer.shape()) << " " << buffer.dtype() << " (offset "
      << buffer.offset() << ") cannot hold a message of " << nbytes_ << " bytes at byte " << base;
  const Part& p = parts_[static_cast<size_t>(part)];
  const int64_t element = static_cast<int64_t>(dtype_size(p.dtype));
  return make_tensor(buffer.storage(), p.shape, contiguous_strides(p.shape),
                     (buffer.offset() + base + p.offset) / element, p.dtype);
}

void add_rows(Tensor& dst, const Tensor& src, int64_t start) {
  LOOM_CHECK(dst.is_contiguous() && dst.dim() >= 2 && src.dim() == dst.dim() && src.size(0) == dst.size(0) &&
             start >= 0 && start + src.size(1) <= dst.size(1) &&
             src.numel() * dst.size(1) == dst.numel() * src.size(1))
      << "add_rows: src " << shape_str(src.shape()) << " at row " << start << " does not fit dst "
      << shape_str(dst.shape());
  const int64_t B = dst.size(0), n = src.size(1);
  if (n == 0) return;
  Stream& stream = stream_for(dst);
  for (int64_t b = 0; b < B; ++b) {  // one contiguous run of rows per batch entry
    Tensor rows = dst.select(0, b).narrow(0, start, n);
    dispatch::axpy(rows, src.select(0, b), 1.0, stream);
  }
}

struct RingHop::HopEvents {
  Event transfer_start, transfer_end, compute_start, compute_end;
  explicit HopEvents(Device d) : transfer_start(d), transfer_end(d), compute_start(d), compute_end(d) {}
};

RingHop::RingHop(Communicator& cp, Stream& compute, bool timed)
    : cp_(cp), compute_(compute), timed_(timed && compute.device().is_cuda()) {}

RingHop::~RingHop() {
  try {
    wait();
  } catch (...) {
  }
}

void RingHop::post(const Tensor& send, Tensor& recv) {
  LOOM_CHECK(!pending_) << "RingHop: a hop is already in flight on group '" << cp_.name() << "'; wait() first";
  const int P = cp_.size(), r = cp_.rank();
  const int to = (r + 1) % P, from = (r + P - 1) % P;
  send_ = send;
  recv_ = recv;
  pending_ = true;
  if (compute_.device().is_cpu()) {  // MPI's send_recv completes here
    cp_.send_recv(send, to, recv, from, compute_);
    return;
  }
  if (!hop_stream_) {  // made at the first hop (a one-rank ring has none)
    hop_stream_ = std::make_unique<Stream>(compute_.device());
    ready_ = std::make_unique<Event>(compute_.device());
    done_ = std::make_unique<Event>(compute_.device());
  }
  // The transfer starts after everything queued on the compute stream so far
  // (the message was packed there, and the receive buffer was last read there).
  ready_->record(compute_);
  ready_->wait(*hop_stream_);
  HopEvents* events = nullptr;
  if (timed_) events = hop_events_.emplace_back(std::make_unique<HopEvents>(compute_.device())).get();
  if (events) events->transfer_start.record(*hop_stream_);
  // The communicator orders its own stream after the hop stream and the hop
  // stream after the transfer; the compute stream is not involved.
  cp_.send_recv(send, to, recv, from, *hop_stream_);
  if (events) events->transfer_end.record(*hop_stream_);
  done_->record(*hop_stream_);
  if (events) events->compute_start.record(compute_);
}

void RingHop::wait() {
  if (!pending_) return;
  if (hop_stream_) {
    if (timed_) hop_events_.back()->compute_end.record(compute_);
    done_->wait(compute_);  // stream order, no host sync
  }
  // The compute stream now runs after the transfer, so dropping the buffers
  // here (stream-ordered frees on the compute stream) is safe.
  send_ = Tensor();
  recv_ = Tensor();
  pending_ = false;
}

void RingHop::add_times(RingHopTimes& times) {
  if (!timed_) return;
  wait();
  for (const std::unique_ptr<HopEvents>& e : hop_events_) {
    // Host sync on purpose: timing was asked for, and event times exist only once the events completed.
    e->transfer_end.synchronize();
    e->compute_end.synchronize();
    times.hops += 1;
    times.compute_ms += e->compute_start.elapsed_ms(e->compute_end);
    times.transfer_ms += e->transfer_start.elapsed_ms(e->transfer_end);
    times.exposed_ms += std::max(0.0f, e->compute_end.elapsed_ms(e->transfer_end));
    times.step_ms +=
        std::max(e->transfer_start.elapsed_ms(e->compute_end), e->transfer_start.elapsed_ms(e->transfer_end));
  }
  hop_events_.clear();
}

}  // namespace sp
}  // namespace loom

// cuDNN attention (see cudnn_attention.h). The forward and backward are
// operation graphs in cuDNN's backend API, laid out the way cuDNN's fused
// flash-attention engine recognizes them (scores, scale, optional causal
// select, softmax with statistics, second product); tensors are declared as
// (B, heads, tokens, D) views of loom's token-major storage through strides.
// Each shape's execution plan is built once (cuDNN compiles the kernel at
// that point) and cached per device.
#include "kernels/cuda/cudnn_attention.h"

#include <string>

#ifdef LOOM_WITH_CUDNN
#include <cudnn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "framework/cuda_check.h"
#include "framework/storage.h"
#endif

namespace loom::cuda {

#ifndef LOOM_WITH_CUDNN

bool cudnn_attention_available() { return false; }
std::string cudnn_attention_version() { return "built without cuDNN"; }
bool cudnn_attention_takes(const Tensor&, const Tensor&, const Tensor&, bool) { return false; }
bool cudnn_attention_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                             Stream&) {
  LOOM_FAIL() << "attention: loom was built without cuDNN (model.attention_backend = cudnn needs it)";
}
bool cudnn_attention_backward(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, int64_t, double, Stream&) {
  LOOM_FAIL() << "attention: loom was built without cuDNN (model.attention_backend = cudnn needs it)";
}
std::string cudnn_attention_last_error() { return ""; }

#else

namespace {

std::string last_error_message() {
  char message[1024] = {0};
  cudnnGetLastErrorString(message, sizeof(message));
  return message;
}

#define LOOM_CUDNN_CHECK(call)                                                                                  \
  do {                                                                                                          \
    cudnnStatus_t status_ = (call);                                                                             \
    LOOM_CHECK(status_ == CUDNN_STATUS_SUCCESS) << #call << ": " << cudnnGetErrorString(status_) << " ("      \
                                                << last_error_message() << ")";                                \
  } while (0)

// A cuDNN error while building a graph: the engine does not take it. Caught
// by the builders, remembered per shape.
struct NoPlan {
  std::string what;
};

void build_check(cudnnStatus_t status, const char* what) {
  if (status != CUDNN_STATUS_SUCCESS)
    throw NoPlan{std::string(what) + ": " + cudnnGetErrorString(status) + " (" + last_error_message() + ")"};
}

// One backend descriptor, destroyed with its owner.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) {
    build_check(cudnnBackendCreateDescriptor(type, &desc_), "cudnnBackendCreateDescriptor");
  }
  ~Desc() {
    if (desc_ != nullptr) cudnnBackendDestroyDescriptor(desc_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return desc_; }

  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count, const void* values,
            const char* what) {
    build_check(cudnnBackendSetAttribute(desc_, name, type, count, values), what);
    return *this;
  }
  Desc& set_i64(cudnnBackendAttributeName_t name, int64_t value, const char* what) {
    return set(name, CUDNN_TYPE_INT64, 1, &value, what);
  }
  Desc& set_i64s(cudnnBackendAttributeName_t name, const std::vector<int64_t>& values, const char* what) {
    return set(name, CUDNN_TYPE_INT64, static_cast<int64_t>(values.size()), values.data(), what);
  }
  Desc& set_type(cudnnBackendAttributeName_t name, cudnnDataType_t value, const char* what) {
    return set(name, CUDNN_TYPE_DATA_TYPE, 1, &value, what);
  }
  Desc& set_bool(cudnnBackendAttributeName_t name, bool value, const char* what) {
    return set(name, CUDNN_TYPE_BOOLEAN, 1, &value, what);
  }
  Desc& set_desc(cudnnBackendAttributeName_t name, const Desc& other, const char* what) {
    cudnnBackendDescriptor_t d = other.get();
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &d, what);
  }
  void finalize(const char* what) { build_check(cudnnBackendFinalize(desc_), what); }

 private:
  cudnnBackendDescriptor_t desc_ = nullptr;
};

using Dims = std::vector<int64_t>;

// Unique ids of the tensors the caller binds (virtual tensors count up from kFirstVirtual).
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kMaskFill, kDiagonal, kDO, kDQ, kDK, kDV, kSoftmaxSum, kDQAccum, kOne,
  kFirstVirtual = 100
};

// An operation graph under construction: the descriptors it owns and its operations in order.
class Graph {
 public:
  const Desc& tensor(int64_t uid, const Dims& dims, const Dims& strides, cudnnDataType_t type, bool is_virtual,
                     bool by_value = false) {
    auto d = std::make_unique<Desc>(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    d->set_type(CUDNN_ATTR_TENSOR_DATA_TYPE, type, "tensor data type")
        .set_i64s(CUDNN_ATTR_TENSOR_DIMENSIONS, dims, "tensor dims")
        .set_i64s(CUDNN_ATTR_TENSOR_STRIDES, strides, "tensor strides")
        .set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid, "tensor uid")
        .set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16, "tensor alignment")
        .set_bool(CUDNN_ATTR_TENSOR_IS_VIRTUAL, is_virtual, "tensor virtual");
    if (by_value) d->set_bool(CUDNN_ATTR_TENSOR_IS_BY_VALUE, true, "tensor by value");
    d->finalize("tensor");
    return keep(std::move(d));
  }
  // A virtual tensor of the given shape: packed strides, or `strides` when given.
  const Desc& virt(const Dims& dims, cudnnDataType_t type, Dims strides = {}) {
    if (strides.empty()) strides = packed(dims);
    return tensor(next_virtual_++, dims, strides, type, true);
  }
  // A by-value f32 scalar bound to a host float at execution.
  const Desc& scalar(int64_t uid, cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    return tensor(uid, {1, 1, 1, 1}, {1, 1, 1, 1}, type, false, true);
  }

  // The mask's index tensors: f32 or i32; the diagonal scalar has the same type.
  bool index_i32 = false;

  // A new virtual (dims, type) tensor = mode(x, b): the common case of pointwise() below.
  const Desc& apply(cudnnPointwiseMode_t mode, const Desc& x, const Desc* b, const Dims& dims,
                    cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    const Desc& y = virt(dims, type);
    pointwise(mode, x, b, nullptr, y);
    return y;
  }
  // y = mode(x, b, t); b and t may be null.
  void pointwise(cudnnPointwiseMode_t mode, const Desc& x, const Desc* b, const Desc* t, const Desc& y,
                 cudnnDataType_t precision = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    auto pw = std::make_unique<Desc>(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw->set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode, "pointwise mode")
        .set_type(CUDNN_ATTR_POINTWISE_MATH_PREC, precision, "pointwise precision");
    if (axis >= 0) pw->set_i64(CUDNN_ATTR_POINTWISE_AXIS, axis, "pointwise axis");
    pw->finalize("pointwise descriptor");
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, *pw, "pointwise op descriptor")
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x, "pointwise x")
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y, "pointwise y");
    if (b != nullptr) op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b, "pointwise b");
    if (t != nullptr) op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t, "pointwise t");
    float one = 1.0f;
    op->set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one, "pointwise alpha1");
    if (b != nullptr) op->set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one, "pointwise alpha2");
    op->finalize("pointwise op");
    keep(std::move(pw));
    add_op(std::move(op));
  }
  void matmul(const Desc& a, const Desc& b, const Desc& c) {
    auto mm = std::make_unique<Desc>(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm->set_type(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT, "matmul compute type").finalize("matmul descriptor");
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a, "matmul a")
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b, "matmul b")
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c, "matmul c")
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, *mm, "matmul op descriptor")
        .finalize("matmul op");
    keep(std::move(mm));
    add_op(std::move(op));
  }
  // y = reduce(x) over the axes where y has size 1 and x does not.
  void reduction(cudnnReduceTensorOp_t mode, const Desc& x, const Desc& y) {
    auto red = std::make_unique<Desc>(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    red->set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode, "reduction operator")
        .set_type(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT, "reduction compute type")
        .finalize("reduction descriptor");
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x, "reduction x")
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y, "reduction y")
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, *red, "reduction op descriptor")
        .finalize("reduction op");
    keep(std::move(red));
    add_op(std::move(op));
  }
  // y = x seen through y's dims and strides (a transpose, for cuDNN).
  void reshape(const Desc& x, const Desc& y) {
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x, "reshape x")
        .set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y, "reshape y")
        .finalize("reshape op");
    add_op(std::move(op));
  }

  // The operation graph, the first heuristic engine config whose plan builds, and that plan.
  void build(cudnnHandle_t handle) {
    graph_ = std::make_unique<Desc>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    graph_->set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle, "graph handle")
        .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(ops_.size()),
             ops_.data(), "graph ops")
        .finalize("operation graph");
    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, *graph_, "heuristics graph")
        .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode, "heuristics mode")
        .finalize("engine heuristics");
    int64_t available = 0;
    build_check(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                         &available, nullptr),
                "heuristic result count");
    if (available == 0) throw NoPlan{"no engine config from the heuristics (" + last_error_message() + ")"};
    std::vector<std::unique_ptr<Desc>> configs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int64_t i = 0; i < available; ++i) {
      configs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      raw.push_back(configs.back()->get());
    }
    int64_t returned = 0;
    build_check(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                         available, &returned, raw.data()),
                "heuristic results");
    std::string reasons;
    for (int64_t i = 0; i < returned; ++i) {
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      plan->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle, "plan handle");
      plan->set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *configs[static_cast<size_t>(i)], "plan config");
      cudnnStatus_t status = cudnnBackendFinalize(plan->get());
      if (status != CUDNN_STATUS_SUCCESS) {
        reasons += std::string(" [config ") + std::to_string(i) + ": " + cudnnGetErrorString(status) + " " +
                   last_error_message() + "]";
        continue;
      }
      int64_t count = 0;
      build_check(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                           &count, &workspace_),
                  "plan workspace size");
      plan_ = std::move(plan);
      return;
    }
    throw NoPlan{"no engine config of " + std::to_string(returned) + " builds a plan:" + reasons};
  }

  int64_t workspace() const { return workspace_; }

  // Runs the plan with tensors bound by uid (device pointers; host pointers for by-value scalars).
  void execute(cudnnHandle_t handle, const std::vector<std::pair<int64_t, void*>>& bindings, void* workspace) const {
    std::vector<int64_t> uids;
    std::vector<void*> pointers;
    for (const auto& [uid, pointer] : bindings) {
      uids.push_back(uid);
      pointers.push_back(pointer);
    }
    try {
      Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
      pack.set_i64s(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, uids, "variant uids")
          .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, static_cast<int64_t>(pointers.size()),
               pointers.data(), "variant pointers")
          .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace, "variant workspace")
          .finalize("variant pack");
      LOOM_CUDNN_CHECK(cudnnBackendExecute(handle, plan_->get(), pack.get()));
    } catch (const NoPlan& e) {
      LOOM_FAIL() << "cuDNN attention: " << e.what;
    }
  }

  static Dims packed(const Dims& dims) {
    Dims strides(dims.size(), 1);
    for (size_t i = dims.size() - 1; i > 0; --i) strides[i - 1] = strides[i] * dims[i];
    return strides;
  }

 private:
  const Desc& keep(std::unique_ptr<Desc> d) {
    owned_.push_back(std::move(d));
    return *owned_.back();
  }
  void add_op(std::unique_ptr<Desc> op) {
    ops_.push_back(op->get());
    keep(std::move(op));
  }

  std::vector<std::unique_ptr<Desc>> owned_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  std::unique_ptr<Desc> graph_, plan_;
  int64_t next_virtual_ = kFirstVirtual;
  int64_t workspace_ = 0;
};

// The attention shape a plan is built for.
struct Shape4 {
  int64_t B, T, S, H, Hkv, D;
};

// (B, heads, tokens, D) view of token-major storage (B, tokens, heads, D).
Dims token_major_strides(int64_t tokens, int64_t heads, int64_t D) { return {tokens * heads * D, D, heads * D, 1}; }
// The same storage seen as (B, heads, D, tokens): the transposed operand of a product.
Dims token_major_transposed(int64_t tokens, int64_t heads, int64_t D) {
  return {tokens * heads * D, D, 1, heads * D};
}

// Whether `diagonal` masks anything among S keys.
bool masked(int64_t diagonal, int64_t S) { return diagonal < S - 1; }

// Diagonal select: s (B, H, T, S) -> s where col <= row + diagonal, else the
// fill scalar (-inf). diagonal 0 is the plain causal pattern; otherwise the
// row index is shifted by a by-value scalar first (the bottom-right form).
const Desc& causal_select(Graph& g, const Desc& s, const Shape4& n, int64_t diagonal) {
  Dims scores{n.B, n.H, n.T, n.S};
  const cudnnDataType_t index = g.index_i32 ? CUDNN_DATA_INT32 : CUDNN_DATA_FLOAT;
  const Desc& row = g.virt(scores, index);
  const Desc& col = g.virt(scores, index);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, s, nullptr, nullptr, row, index, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, s, nullptr, nullptr, col, index, 3);
  const Desc* shifted = &row;
  if (diagonal != 0) {
    shifted = &g.virt(scores, index);
    g.pointwise(CUDNN_POINTWISE_ADD, row, &g.scalar(kDiagonal, index), nullptr, *shifted, index);
  }
  const Desc& keep = g.virt(scores, CUDNN_DATA_BOOLEAN);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, *shifted, &col, nullptr, keep, CUDNN_DATA_BOOLEAN);
  const Desc& fill = g.scalar(kMaskFill);
  const Desc& masked = g.virt(scores, CUDNN_DATA_FLOAT);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, s, &fill, &keep, masked);
  return masked;
}

// Forward: S = Q K^T * scale (causal select), softmax with Stats = max + log(sum exp), O = P V.
void build_forward(Graph& g, const Shape4& n, int64_t diagonal) {
  const Desc& q = g.tensor(kQ, {n.B, n.H, n.T, n.D}, token_major_strides(n.T, n.H, n.D), CUDNN_DATA_BFLOAT16, false);
  const Desc& kt =
      g.tensor(kK, {n.B, n.Hkv, n.D, n.S}, token_major_transposed(n.S, n.Hkv, n.D), CUDNN_DATA_BFLOAT16, false);
  const Desc& v =
      g.tensor(kV, {n.B, n.Hkv, n.S, n.D}, token_major_strides(n.S, n.Hkv, n.D), CUDNN_DATA_BFLOAT16, false);
  const Desc& o = g.tensor(kO, {n.B, n.H, n.T, n.D}, token_major_strides(n.T, n.H, n.D), CUDNN_DATA_BFLOAT16, false);
  Dims rows{n.B, n.H, n.T, 1};
  const Desc& stats = g.tensor(kStats, rows, Graph::packed(rows), CUDNN_DATA_FLOAT, false);
  const Desc& scale = g.scalar(kScale);
  Dims scores{n.B, n.H, n.T, n.S};

  const Desc& s = g.virt(scores, CUDNN_DATA_FLOAT);
  g.matmul(q, kt, s);
  const Desc& scaled = g.apply(CUDNN_POINTWISE_MUL, s, &scale, scores);
  const Desc& logits = masked(diagonal, n.S) ? causal_select(g, scaled, n, diagonal) : scaled;
  const Desc& m = g.virt(rows, CUDNN_DATA_FLOAT);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, logits, m);
  const Desc& e = g.apply(CUDNN_POINTWISE_EXP, g.apply(CUDNN_POINTWISE_SUB, logits, &m, scores), nullptr, scores);
  const Desc& z = g.virt(rows, CUDNN_DATA_FLOAT);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, z);
  const Desc& log_z = g.apply(CUDNN_POINTWISE_LOG, z, nullptr, rows);
  g.pointwise(CUDNN_POINTWISE_ADD, m, &log_z, nullptr, stats);
  // P in bf16: the second product's operand type.
  g.matmul(g.apply(CUDNN_POINTWISE_DIV, e, &z, scores, CUDNN_DATA_BFLOAT16), v, o);
}

// dst (B, Hkv, tokens, D) from per-query-head products: directly when H == Hkv,
// else through a (B, H, tokens, D) virtual summed over each group's heads.
void grouped_product(Graph& g, const Desc& a, const Desc& b, const Desc& dst, const Shape4& n, int64_t tokens) {
  if (n.H == n.Hkv) return g.matmul(a, b, dst);
  const Desc& full = g.virt({n.B, n.H, tokens, n.D}, CUDNN_DATA_BFLOAT16);
  g.matmul(a, b, full);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, full, dst);
}

// Backward from dO, O, Stats: softmax_sum = rowsum(dO * O); P = exp(S * scale - Stats)
// (causal select); dV = P^T dO; dS = P (dO V^T - softmax_sum) * scale;
// dK = dS^T Q; dQ = dS K (accumulated in f32, then cast).
void build_backward(Graph& g, const Shape4& n, int64_t diagonal) {
  Dims q_dims{n.B, n.H, n.T, n.D}, kv_dims{n.B, n.Hkv, n.S, n.D};
  Dims q_strides = token_major_strides(n.T, n.H, n.D), kv_strides = token_major_strides(n.S, n.Hkv, n.D);
  Dims kvt_dims{n.B, n.Hkv, n.D, n.S}, kvt_strides = token_major_transposed(n.S, n.Hkv, n.D);
  Dims rows{n.B, n.H, n.T, 1}, scores{n.B, n.H, n.T, n.S}, scores_t{n.B, n.H, n.S, n.T};
  Dims scores_t_strides{n.H * n.T * n.S, n.T * n.S, 1, n.S};  // the (T, S) scores read transposed
  const Desc& q = g.tensor(kQ, q_dims, q_strides, CUDNN_DATA_BFLOAT16, false);
  const Desc& kt = g.tensor(kK, kvt_dims, kvt_strides, CUDNN_DATA_BFLOAT16, false);
  const Desc& vt = g.tensor(kV, kvt_dims, kvt_strides, CUDNN_DATA_BFLOAT16, false);
  const Desc& o = g.tensor(kO, q_dims, q_strides, CUDNN_DATA_BFLOAT16, false);
  const Desc& d_o = g.tensor(kDO, q_dims, q_strides, CUDNN_DATA_BFLOAT16, false);
  const Desc& stats = g.tensor(kStats, rows, Graph::packed(rows), CUDNN_DATA_FLOAT, false);
  const Desc& dq = g.tensor(kDQ, q_dims, q_strides, CUDNN_DATA_BFLOAT16, false);
  const Desc& dk = g.tensor(kDK, kv_dims, kv_strides, CUDNN_DATA_BFLOAT16, false);
  const Desc& dv = g.tensor(kDV, kv_dims, kv_strides, CUDNN_DATA_BFLOAT16, false);
  const Desc& softmax_sum = g.tensor(kSoftmaxSum, rows, Graph::packed(rows), CUDNN_DATA_FLOAT, false);
  const Desc& dq_accum = g.tensor(kDQAccum, q_dims, Graph::packed(q_dims), CUDNN_DATA_FLOAT, false);
  const Desc& scale = g.scalar(kScale);
  const Desc& one = g.scalar(kOne);

  const Desc& row_sum = g.virt(rows, CUDNN_DATA_FLOAT);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, g.apply(CUDNN_POINTWISE_MUL, d_o, &o, q_dims), row_sum);
  g.pointwise(CUDNN_POINTWISE_MUL, row_sum, &one, nullptr, softmax_sum);

  const Desc& s = g.virt(scores, CUDNN_DATA_FLOAT);
  g.matmul(q, kt, s);
  const Desc& centered =
      g.apply(CUDNN_POINTWISE_SUB, g.apply(CUDNN_POINTWISE_MUL, s, &scale, scores), &stats, scores);
  const Desc& logits = masked(diagonal, n.S) ? causal_select(g, centered, n, diagonal) : centered;
  const Desc& p = g.apply(CUDNN_POINTWISE_EXP, logits, nullptr, scores);

  const Desc& p_t = g.virt(scores_t, CUDNN_DATA_BFLOAT16, scores_t_strides);
  g.reshape(p, p_t);
  grouped_product(g, p_t, d_o, dv, n, n.S);

  const Desc& dp = g.virt(scores, CUDNN_DATA_FLOAT);
  g.matmul(d_o, vt, dp);
  const Desc& dp_p = g.apply(CUDNN_POINTWISE_MUL, g.apply(CUDNN_POINTWISE_SUB, dp, &softmax_sum, scores), &p, scores);
  const Desc& ds = g.apply(CUDNN_POINTWISE_MUL, dp_p, &scale, scores);

  const Desc& ds_t = g.virt(scores_t, CUDNN_DATA_BFLOAT16, scores_t_strides);
  g.reshape(ds, ds_t);
  grouped_product(g, ds_t, q, dk, n, n.S);

  const Desc& k = g.virt(kv_dims, CUDNN_DATA_BFLOAT16, kv_strides);
  g.reshape(kt, k);
  g.matmul(ds, k, dq_accum);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, dq_accum, nullptr, nullptr, dq);
}

using Key = AttentionShape;

struct Cache {
  std::mutex mutex;
  std::map<int, cudnnHandle_t> handles;         // per device, kept for the process lifetime
  std::map<Key, std::shared_ptr<Graph>> plans;  // null: no engine takes the shape
  std::string last_error;
};
Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: plans may be used until exit
  return *c;
}

// The plan for `key` (built on first use; null when cuDNN has none) and the
// device's handle (the callers bind it to their stream before executing).
std::pair<std::shared_ptr<Graph>, cudnnHandle_t> plan_for(const Key& key) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto h = c.handles.find(key.device);
  if (h == c.handles.end()) {
    cudnnHandle_t handle;
    LOOM_CUDNN_CHECK(cudnnCreate(&handle));
    h = c.handles.emplace(key.device, handle).first;
  }
  auto it = c.plans.find(key);
  if (it == c.plans.end()) {
    Shape4 n{key.B, key.T, key.S, key.H, key.Hkv, key.D};
    std::shared_ptr<Graph> graph;
    std::string reasons;
    // The mask's index type: f32 first for the plain causal diagonal (then
    // i32 where that has no engine); i32 only for a shifted one (cuDNN 9.14
    // builds the f32 shifted mask but applies it wrongly: measured on an
    // H100, rows then saw keys past their diagonal).
    std::vector<bool> index_forms{false};
    if (masked(key.diagonal, key.S)) index_forms = key.diagonal != 0 ? std::vector<bool>{true} : std::vector<bool>{false, true};
    for (bool index_i32 : index_forms) {
      try {
        auto g = std::make_shared<Graph>();
        g->index_i32 = index_i32;
        if (key.backward) build_backward(*g, n, key.diagonal);
        else build_forward(*g, n, key.diagonal);
        g->build(h->second);
        graph = std::move(g);
        break;
      } catch (const NoPlan& e) {
        reasons += std::string(reasons.empty() ? "" : "; ") + (index_i32 ? "i32 index: " : "") + e.what;
      }
    }
    if (!graph) {
      c.last_error = std::string(key.backward ? "backward" : "forward") + " B " + std::to_string(n.B) + " T " +
                     std::to_string(n.T) + " S " + std::to_string(n.S) + " H " + std::to_string(n.H) + " Hkv " +
                     std::to_string(n.Hkv) + " D " + std::to_string(n.D) + " diagonal " +
                     std::to_string(key.diagonal) + ": " + reasons;
      std::fprintf(stderr, "loom: cuDNN %s has no attention engine for %s; the native kernels run that shape\n",
                   cudnn_attention_version().c_str(), c.last_error.c_str());
    }
    it = c.plans.emplace(key, graph).first;
  }
  return {it->second, h->second};
}

Key key_of(const Tensor& q, const Tensor& k, bool backward, int64_t diagonal) {
  return attention_shape(q, k, backward, std::min(diagonal, k.size(1)));  // every unmasked diagonal is one plan
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The by-value scalars of the mask (fill, diagonal shift in the plan's index type), bound for one execution.
struct MaskScalars {
  float fill = -std::numeric_limits<float>::infinity(), shift = 0;
  int32_t shift_i32 = 0;
  MaskScalars(const Key& key, const Graph& plan, std::vector<std::pair<int64_t, void*>>& bindings)
      : shift(static_cast<float>(key.diagonal)), shift_i32(static_cast<int32_t>(key.diagonal)) {
    if (!masked(key.diagonal, key.S)) return;
    bindings.emplace_back(kMaskFill, &fill);
    if (key.diagonal != 0) bindings.emplace_back(kDiagonal, plan.index_i32 ? static_cast<void*>(&shift_i32) : &shift);
  }
};

void* ptr(const Tensor& t) { return const_cast<void*>(t.raw_data()); }

}  // namespace

bool cudnn_attention_available() { return cudnnGetVersion() >= 90000; }

std::string cudnn_attention_version() {
  size_t v = cudnnGetVersion();
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

bool cudnn_attention_takes(const Tensor& q, const Tensor& k, const Tensor& v, bool backward) {
  if (!q.defined() || !k.defined() || !v.defined() || q.dim() != 4 || k.dim() != 4) return false;
  if (q.dtype() != DType::bf16 || k.dtype() != DType::bf16 || v.dtype() != DType::bf16) return false;
  if (!q.device().is_cuda() || !q.is_contiguous() || !k.is_contiguous() || !v.is_contiguous()) return false;
  if (q.size(3) != 64 && q.size(3) != 128) return false;
  if (!aligned16(q.raw_data()) || !aligned16(k.raw_data()) || !aligned16(v.raw_data())) return false;
  if (!cudnn_attention_available()) return false;
  // cuDNN's backward before 9.16 needs a padding-mask workaround unless both
  // lengths are multiples of 128; loom sends only such shapes there.
  if (backward && (q.size(1) % 128 != 0 || k.size(1) % 128 != 0)) return false;
  return true;
}

bool cudnn_attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             int64_t diagonal, double scale, Stream& s) {
  const Key key = key_of(q, k, false, diagonal);
  auto [plan, handle] = plan_for(key);
  if (!plan) return false;
  Storage workspace(static_cast<size_t>(std::max<int64_t>(plan->workspace(), 16)), q.device(), &s);
  float scale_f = static_cast<float>(scale);
  std::vector<std::pair<int64_t, void*>> bindings{{kQ, ptr(q)},     {kK, ptr(k)},         {kV, ptr(v)},
                                                  {kO, ptr(out)},   {kStats, ptr(lse)},   {kScale, &scale_f}};
  MaskScalars mask(key, *plan, bindings);
  std::lock_guard<std::mutex> lock(cache().mutex);  // the handle's stream binding holds until the launch
  LOOM_CUDNN_CHECK(cudnnSetStream(handle, static_cast<cudaStream_t>(s.handle())));
  plan->execute(handle, bindings, workspace.data());
  return true;
}

bool cudnn_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                              const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                              int64_t diagonal, double scale, Stream& s) {
  const Key key = key_of(q, k, true, diagonal);
  auto [plan, handle] = plan_for(key);
  if (!plan) return false;
  int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  // Scratch: the f32 dQ accumulator (B, H, T, D) and softmax_sum (B, H, T), then cuDNN's workspace.
  int64_t accum_bytes = B * H * T * D * 4, sum_bytes = (B * H * T * 4 + 255) / 256 * 256;
  Storage scratch(static_cast<size_t>(accum_bytes + sum_bytes + std::max<int64_t>(plan->workspace(), 16)),
                  q.device(), &s);
  char* base = static_cast<char*>(scratch.data());
  float scale_f = static_cast<float>(scale), one = 1.0f;
  std::vector<std::pair<int64_t, void*>> bindings{
      {kQ, ptr(q)},   {kK, ptr(k)},   {kV, ptr(v)},   {kO, ptr(out)},   {kDO, ptr(dout)},
      {kStats, ptr(lse)}, {kDQ, ptr(dq)}, {kDK, ptr(dk)}, {kDV, ptr(dv)}, {kDQAccum, base},
      {kSoftmaxSum, base + accum_bytes}, {kScale, &scale_f}, {kOne, &one}};
  MaskScalars mask(key, *plan, bindings);
  LOOM_CUDA_CHECK(cudaMemsetAsync(base, 0, static_cast<size_t>(accum_bytes), static_cast<cudaStream_t>(s.handle())));
  std::lock_guard<std::mutex> lock(cache().mutex);
  LOOM_CUDNN_CHECK(cudnnSetStream(handle, static_cast<cudaStream_t>(s.handle())));
  plan->execute(handle, bindings, base + accum_bytes + sum_bytes);
  return true;
}

std::string cudnn_attention_last_error() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().last_error;
}

#endif  // LOOM_WITH_CUDNN

}  // namespace loom::cuda

// TokenLayout: chunk bookkeeping and the shard/unshard copies (see token_layout.h).
#include "parallel/token_layout.h"

#include "framework/error.h"

namespace loom {

LayoutKind parse_layout_kind(const std::string& name) {
  if (name == "contiguous") return LayoutKind::contiguous;
  if (name == "zigzag") return LayoutKind::zigzag;
  LOOM_CHECK(false) << "unknown token layout '" << name << "' (expected contiguous or zigzag)";
  return LayoutKind::contiguous;
}

const char* layout_kind_name(LayoutKind kind) { return kind == LayoutKind::zigzag ? "zigzag" : "contiguous"; }

TokenLayout::TokenLayout(LayoutKind kind, int64_t seq_len, int cp_size) : kind_(kind), seq_len_(seq_len), cp_size_(cp_size) {
  LOOM_CHECK(cp_size >= 1) << "token layout: cp size must be >= 1, got " << cp_size;
  LOOM_CHECK(seq_len >= 1) << "token layout: seq_len must be >= 1, got " << seq_len;
  const int64_t pieces = kind == LayoutKind::zigzag ? 2 * int64_t{cp_size} : int64_t{cp_size};
  LOOM_CHECK(seq_len % pieces == 0) << "token layout " << layout_kind_name(kind) << ": seq_len " << seq_len
                                    << " is not a multiple of " << pieces
                                    << (kind == LayoutKind::zigzag ? " (2 * cp, cp = " : " (cp, cp = ") << cp_size
                                    << "); choose a seq_len divisible by " << pieces << " (loom does not pad)";
  const int64_t chunk = seq_len / pieces;
  chunks_.resize(static_cast<size_t>(cp_size));
  for (int r = 0; r < cp_size; ++r) {
    if (kind == LayoutKind::contiguous) {
      chunks_[r] = {TokenChunk{r * chunk, chunk}};
    } else {
      chunks_[r] = {TokenChunk{r * chunk, chunk}, TokenChunk{(2 * int64_t{cp_size} - 1 - r) * chunk, chunk}};
    }
  }
}

void TokenLayout::check_rank(int rank, const char* what) const {
  LOOM_CHECK(rank >= 0 && rank < cp_size_) << "token layout " << what << ": rank " << rank << " out of range for cp "
                                           << cp_size_;
}

const std::vector<TokenChunk>& TokenLayout::chunks(int rank) const {
  check_rank(rank, "chunks");
  return chunks_[static_cast<size_t>(rank)];
}

Tensor TokenLayout::positions(int rank) const {
  check_rank(rank, "positions");
  Tensor out = Tensor::empty({local_len()}, DType::i64);  // (T / P)
  int64_t* p = out.data<int64_t>();
  for (const TokenChunk& c : chunks_[rank]) {
    for (int64_t i = 0; i < c.length; ++i) *p++ = c.start + i;
  }
  return out;
}

Tensor TokenLayout::shard(const Tensor& global, int rank, int dim) const {
  check_rank(rank, "shard");
  LOOM_CHECK(global.defined()) << "token layout shard: undefined tensor";
  const int64_t d = wrap_dim(dim, global.dim());
  LOOM_CHECK(global.size(d) == seq_len_) << "token layout shard: dim " << dim << " of " << shape_str(global.shape())
                                         << " must be seq_len " << seq_len_;
  Shape shape = global.shape();
  shape[d] = local_len();
  Tensor out = Tensor::empty(shape, global.dtype(), global.device());
  int64_t at = 0;
  for (const TokenChunk& c : chunks_[rank]) {
    out.narrow(d, at, c.length).copy_(global.narrow(d, c.start, c.length));
    at += c.length;
  }
  return out;
}

Tensor TokenLayout::unshard(const std::vector<Tensor>& locals, int dim) const {
  LOOM_CHECK(static_cast<int>(locals.size()) == cp_size_) << "token layout unshard: " << locals.size()
                                                          << " shards for cp " << cp_size_;
  const Tensor& first = locals[0];
  LOOM_CHECK(first.defined()) << "token layout unshard: shard 0 is undefined";
  const int64_t d = wrap_dim(dim, first.dim());
  Shape shape = first.shape();
  shape[d] = seq_len_;
  Tensor out = Tensor::empty(shape, first.dtype(), first.device());
  for (int r = 0; r < cp_size_; ++r) {
    const Tensor& local = locals[r];
    Shape want = first.shape();
    want[d] = local_len();
    LOOM_CHECK(local.defined() && local.shape() == want && local.dtype() == first.dtype())
        << "token layout unshard: shard " << r << " is " << (local.defined() ? shape_str(local.shape()) : "undefined")
        << ", expected " << shape_str(want) << " of " << first.dtype();
    int64_t at = 0;
    for (const TokenChunk& c : chunks_[r]) {
      out.narrow(d, c.start, c.length).copy_(local.narrow(d, at, c.length));
      at += c.length;
    }
  }
  return out;
}

}  // namespace loom

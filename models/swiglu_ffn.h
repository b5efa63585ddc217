// Dense SwiGLU feed-forward: down_proj(silu(gate_proj x) * up_proj x).
#pragma once

#include "models/decoder.h"

namespace loom {

class SwiGluFFN : public FeedForward {
 public:
  SwiGluFFN(const DecoderConfig& config, int64_t layer);
  Variable forward(const Variable& x, SequenceContext& ctx) const override;
  int64_t active_parameters() const override { return num_parameters(); }

 private:
  std::shared_ptr<Linear> gate_proj_, up_proj_, down_proj_;
};

}  // namespace loom

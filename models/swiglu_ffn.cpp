// Dense SwiGLU FFN (Llama MLP layout: gate_proj, up_proj, down_proj, no biases).
#include "models/swiglu_ffn.h"

#include "framework/ops.h"

namespace loom {

SwiGluFFN::SwiGluFFN(const DecoderConfig& config, int64_t layer) {
  (void)layer;
  int64_t c = config.d_model, f = config.ffn_hidden;
  InitSpec out_init;
  out_init.kind = InitSpec::Kind::scaled_normal;
  gate_proj_ = register_module("gate_proj", std::make_shared<Linear>(c, f, false, InitSpec{}, config.dtype));
  up_proj_ = register_module("up_proj", std::make_shared<Linear>(c, f, false, InitSpec{}, config.dtype));
  down_proj_ = register_module("down_proj", std::make_shared<Linear>(f, c, false, out_init, config.dtype));
}

Variable SwiGluFFN::forward(const Variable& x, SequenceContext& ctx) const {
  (void)ctx;
  Variable hidden = swiglu(gate_proj_->forward(x), up_proj_->forward(x));  // (B, T, F)
  return down_proj_->forward(hidden);                                      // (B, T, C)
}

}  // namespace loom

// dense_dlm: the transformer diffusion LM of src/model/transformer.h with a dense SwiGLU
// feed-forward (width model.d_ff) in every block (LLaDA, arXiv 2502.09992).
#include <torch/nn/module.h>

#include "core/errors.h"
#include "model/transformer.h"

namespace mixdiff {
namespace {

MIXDIFF_REGISTER(models_registry(), "dense_dlm",
                 "bidirectional transformer dLLM (RMSNorm, RoPE, GQA, QK-norm, SwiGLU; full or "
                 "block-causal attention)",
                 [](const ConfigNode& c) -> std::shared_ptr<ModelBase> {
                   const TransformerOptions o = TransformerOptions::from(c);
                   return std::make_shared<TransformerDlm>(
                       o,
                       [&](int64_t) -> std::shared_ptr<FeedForward> {
                         return std::make_shared<SwiGLU>(o.d_model, o.d_ff);
                       },
                       "dense_dlm");
                 });

}  // namespace
}  // namespace mixdiff

// Conditional likelihood of a continuation given a context under a masked-diffusion LM, by the
// Monte-Carlo bound LLaDA evaluates multiple-choice tasks with (arXiv 2502.09992, Eq. 6 and
// `get_log_likelihood.py`; algorithms.md 1.4):
//
//   -log p(c | x) <= E_{l ~ U{1..|c|}} E_{S subset of c, |S| = l} [ (|c| / l) sum_{i in S} CE_i ]
//
// where CE_i is the cross-entropy of continuation token i when the positions S are [MASK] and the
// context x and the rest of c are clean. Sample j of a request masks exactly
// n_j = ((round(k + j |c| / N) - 1) mod |c|) + 1 tokens (k ~ U{1..|c|} once per request, N the
// number of samples: counts spread evenly over 1..|c|, LLaDA's stratification) at a random
// permutation's first n_j continuation positions; the context is never masked. The estimate is
// the mean of the N samples; its standard error is their standard deviation over sqrt(N)
// (conservative: stratified counts vary less than independent ones). A one-token continuation
// needs one sample (its bound is exact).
// Draws depend only on the options' seed and the continuation's tokens, never on batching, order
// or the context, so the same request scores the same in `mixdiff eval --task` and through
// lm-eval, and requests that share a continuation (the choices of a partial-evaluation item,
// which differ in their contexts) share its masks: common random numbers, so the differences
// between choices carry far less Monte-Carlo noise than each estimate.
// Unsupervised classifier-free guidance (LLaDA, algorithms.md 1.5): with cfg_scale w > 0 the
// logits are u + (w + 1)(l - u), u from the same input with the context masked too.
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"

namespace mixdiff {

struct LoglikRequest {
  std::vector<int32_t> context;       ///< may be empty
  std::vector<int32_t> continuation;  ///< at least one token
};

struct LoglikOptions {
  int64_t samples = 32;     ///< Monte-Carlo samples per request (N)
  int64_t batch_size = 64;  ///< rows per forward
  uint64_t seed = 0;
  double cfg_scale = 0;     ///< unsupervised classifier-free guidance (0: off)
  /// Also report whether every continuation token is the argmax when the whole continuation is
  /// masked (one more forward per request; lm-eval's `is_greedy`).
  bool greedy = false;
};

struct LoglikResult {
  double loglik = 0;   ///< estimate of log p(continuation | context) (the negated bound)
  double se = 0;       ///< its Monte-Carlo standard error
  bool greedy = false;
  int64_t tokens = 0;  ///< continuation tokens scored
};

/// Scores every request. Context and continuation together must fit model.max_seq_len() (the
/// caller cuts the context from the left, as lm-eval does); throws InputError otherwise.
std::vector<LoglikResult> conditional_loglik(ModelBase& model,
                                             const std::vector<LoglikRequest>& requests,
                                             const LoglikOptions& options);

/// SFT validation: the response NELBO per response token of held-out prompt/response rows
/// (x_NL with bool response_NL true on each row's response suffix, EOS padding included), each
/// row's conditional bound divided by its response length, averaged over rows: the expectation
/// of the sft_elbo training loss. `se` combines the rows' Monte-Carlo errors.
struct SftValidation {
  double nelbo = 0, se = 0;
  int64_t pairs = 0, response_tokens = 0;
};
SftValidation sft_validation(ModelBase& model, const at::Tensor& x_NL, const at::Tensor& response_NL,
                             const LoglikOptions& options);

}  // namespace mixdiff

// Prompt/response data for supervised fine-tuning (data.kind: sft_jsonl, data/sft_jsonl.cpp).
//
// Files are JSON Lines, one pair per line:
//   {"prompt": "...", "response": "..."}
//   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
//     rendered by the recipe's chat template (data.template); the last message must be the
//     assistant's and is the response, everything before it (and the template's assistant cue)
//     the prompt:
//       plain   "System: ...\nUser: ...\nAssistant:" + " " + response       (default)
//       chatml  "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n" + response +
//               "<|im_end|>"   (as text: the run's tokenizer has no special tokens)
// A pair is tokenised as lm-eval tokenises a (context, continuation) pair (data/tokenizer.h
// encode_pair), then padded with EOS to data.seq_len as LLaDA's SFT does: the padding belongs to
// the response and is learned (the model learns to stop). A pair whose prompt and response leave
// no room for one EOS is skipped and counted.
//
// The built-in set (`mixdiff data prepare` with data.builtin: wordnet) is made from a prepared
// dataset's WordNet synsets (data.from): prompt "WORD (POS):", response " DEFINITION" (the
// gloss without its examples), the training pairs from the synsets preparation put in the
// training split and the validation pairs from the held-out ones, so the built-in wordnet_mc
// task (made from the held-out synsets) is never trained on.
#pragma once

#include <iosfwd>

#include "core/config.h"

namespace mixdiff {

/// Writes the built-in pairs of `data_cfg` (data.builtin) to its data.train and data.val files;
/// nothing when both exist, unless `force`.
void prepare_sft_pairs(const ConfigNode& data_cfg, bool force, std::ostream& log);

}  // namespace mixdiff

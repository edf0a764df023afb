// Where training and validation sequences come from (registry `data_sources`, recipe key
// data.kind). A source exposes a deterministic, resumable stream: training sequence k (k counts
// sequences from the start of the run, across epochs) is always the same tokens for the same
// recipe, so a run resumed at sequence k reads exactly what the uninterrupted run would have,
// and data-parallel ranks can take disjoint slices of one global batch.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/registry.h"

namespace mixdiff {

class DataSource {
 public:
  virtual ~DataSource() = default;
  virtual int64_t seq_len() const = 0;
  virtual int64_t vocab_size() const = 0;  ///< tokenizer vocabulary (without [MASK])
  virtual int64_t eos_id() const = 0;
  /// Folder holding tokenizer.json (copied into runs and checkpoints).
  virtual std::string tokenizer_dir() const = 0;
  /// Training sequences [first, first + count) of the stream: int64 [count, seq_len].
  virtual at::Tensor train_batch(int64_t first, int64_t count) = 0;
  /// `n` validation sequences spread evenly over the validation split: int64 [n', seq_len]
  /// with n' = min(n, number of validation windows).
  virtual at::Tensor val_sequences(int64_t n) = 0;
  /// Unigram entropy (nats/token) of the whole validation split, when known (else 0).
  virtual double val_unigram_entropy() const { return 0; }
  /// Names of the data's domains by id (the corpora a prepared dataset was made from); empty
  /// when its tokens carry no domain.
  virtual std::vector<std::string> domains() const { return {}; }
  /// The domain id of every token of train_batch(first, count) / val_sequences(n): int64 of the
  /// same shape (-1 where unknown); undefined when the source has no domains.
  virtual at::Tensor train_domains(int64_t first, int64_t count) { return {}; }
  virtual at::Tensor val_domains(int64_t n) { return {}; }
  /// Prompt/response data (SFT): bool [count, seq_len] / [n', seq_len], true at the positions
  /// of each row's response (EOS padding included): the only positions the forward process may
  /// mask and the loss counts. Undefined for pre-training data (every position).
  virtual at::Tensor train_response(int64_t first, int64_t count) { return {}; }
  virtual at::Tensor val_response(int64_t n) { return {}; }
  /// The prepared dataset (data prepare) whose held-out documents the built-in tasks are made
  /// from; "" when there is none.
  virtual std::string task_dataset() const { return ""; }
  virtual std::string describe() const = 0;
};

using DataSourceRegistry = Registry<std::unique_ptr<DataSource>, const ConfigNode&>;
DataSourceRegistry& data_sources_registry();

std::unique_ptr<DataSource> build_data_source(const ConfigNode& data_cfg);

}  // namespace mixdiff

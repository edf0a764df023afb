// Corpus sources and dataset preparation (`mixdiff data prepare RECIPE`).
//
// The recipe's `data.prepare` section names the corpora (registry `corpora`), the tokenizer and
// the validation split:
//   data:
//     path: datasets/quickstart
//     prepare:
//       corpora: [{kind: kjv}, {kind: fortunes}, {kind: wordnet}]
//       tokenizer: {kind: byte_bpe, vocab_size: 4096}   # or {kind: gpt2, dir: path/with/files}
//       val_fraction: 0.01
//       seed: 0
// Preparation writes, into a temporary folder renamed to `path` at the end:
//   tokenizer/   tokenizer.json + encoder.json + vocab.bpe
//   train_000.bin ..., val_000.bin ...   token shards (data/shards.h); documents end with EOS
//   meta.json    the resolved prepare spec, token and document counts, the validation split's
//                unigram entropy, the tokenizer fingerprint
// Documents go to the validation split by a seeded hash of their index, so the split is stable.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <iosfwd>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/config.h"
#include "core/registry.h"
#include "data/tokenizer.h"

namespace mixdiff {

/// Named fields of a document beside its text (a WordNet synset's `pos`, `lemmas`,
/// `definition`), for the built-in tasks and SFT pairs; empty for most corpora.
using DocumentFields = std::map<std::string, std::string>;

/// A source of plain-text documents.
class Corpus {
 public:
  virtual ~Corpus() = default;
  /// Calls `fn` once per document, in a fixed order. Throws DataError when the source is missing.
  virtual void for_each_document(const std::function<void(std::string_view)>& fn) const = 0;
  /// The same documents in the same order, each with its fields.
  virtual void for_each_record(
      const std::function<void(std::string_view, const DocumentFields&)>& fn) const {
    const DocumentFields none;
    for_each_document([&](std::string_view d) { fn(d, none); });
  }
};

using CorpusRegistry = Registry<std::unique_ptr<Corpus>, const ConfigNode&>;
CorpusRegistry& corpora_registry();

/// Makes the tokenizer of a dataset: trains one on the training text, or loads files.
class TokenizerBuilder {
 public:
  virtual ~TokenizerBuilder() = default;
  /// Whether add_text() should be fed the training documents before build().
  virtual bool wants_text() const { return false; }
  virtual void add_text(std::string_view) {}
  virtual Tokenizer build() = 0;
};

using TokenizerBuilderRegistry = Registry<std::unique_ptr<TokenizerBuilder>, const ConfigNode&>;
TokenizerBuilderRegistry& tokenizer_builders();

/// What `meta.json` of a prepared dataset says.
struct DatasetInfo {
  std::string path;
  std::string spec_yaml;  ///< the resolved `prepare` section the data was made from
  std::string tokenizer_kind;
  std::string tokenizer_fingerprint;
  int64_t vocab_size = 0;
  int64_t eos_id = 0;
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
  int64_t train_docs = 0;
  int64_t val_docs = 0;
  double val_unigram_entropy = 0;  ///< nats per token over the whole validation split
  std::vector<std::string> train_shards;  ///< file names relative to `path`
  std::vector<std::string> val_shards;
  /// Domain names, by id: one per distinct `domain:` of the corpora (default: the corpus kind).
  /// Every shard labels its tokens with them. Empty for data prepared before domains were kept.
  std::vector<std::string> domains;
  std::vector<int64_t> train_domain_tokens, val_domain_tokens;  ///< tokens per domain
};

/// Reads `path/meta.json`; DataError (with the hint to run `mixdiff data prepare`) when absent.
DatasetInfo read_dataset_info(const std::string& path);

/// Reads the `prepare` section under `data_cfg` (marking its keys), returns its canonical YAML.
std::string resolve_prepare_spec(const ConfigNode& data_cfg);

/// Prepares the dataset described by `data_cfg` (the recipe's `data` section). Does nothing when
/// `path` already holds data made from the same spec, unless `force`. Progress goes to `log`.
DatasetInfo prepare_dataset(const ConfigNode& data_cfg, bool force, std::ostream& log);

/// Replays the documents of the dataset prepared at `dataset_path` (its corpora, from the spec
/// in meta.json) with the split preparation gave them, per document in order. Built-in tasks and SFT pairs are made from held-out documents this way.
struct SplitDocument {
  std::string_view text;
  const std::string& domain;
  bool validation;
  const DocumentFields& fields;
};
void for_each_split_document(const std::string& dataset_path,
                             const std::function<void(const SplitDocument&)>& fn);

/// Unigram entropy (nats) of a token histogram.
double unigram_entropy(const std::vector<int64_t>& counts);

}  // namespace mixdiff

// Token shards: the on-disk form of prepared data, memory-mapped for training.
//
// Layout of one shard file (little-endian):
//   bytes 0..7    magic "MIXDTOKS"
//   bytes 8..11   u32 format version (1)
//   bytes 12..15  u32 header length H (a multiple of 8)
//   bytes 16..    JSON header, space-padded to H bytes:
//                 {"dtype": "uint16"|"uint32", "n_tokens": N, "vocab_size": V,
//                  "tokenizer": kind, "tokenizer_fingerprint": hex, "split": "train"|"val",
//                  optional "n_domains": D, "domain_runs": [[first token, domain id], ...]}
//   then          N tokens of `dtype`
// A reader refuses a file whose size differs from 16 + H + N * sizeof(dtype) (truncated or
// padded), whose magic or version is wrong, or whose tokens are >= V.
// Domain runs label every token with the domain of its document (the corpus it came from): run
// i covers tokens [first_i, first_{i+1}); the first run starts at 0, starts ascend strictly and
// lie below N, ids lie in [0, D). Shards without them are unlabelled.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/fs.h"

namespace mixdiff {

struct ShardHeader {
  std::string dtype;  ///< "uint16" or "uint32"
  int64_t n_tokens = 0;
  int64_t vocab_size = 0;
  std::string tokenizer;
  std::string tokenizer_fingerprint;
  std::string split;
  int64_t n_domains = 0;  ///< 0: unlabelled
  std::vector<std::pair<int64_t, int64_t>> domain_runs;  ///< (first token, domain id)
};

/// Writes `tokens` as one shard atomically (dtype chosen from the vocabulary size).
void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, ShardHeader header);

/// A validated, memory-mapped shard.
class ShardReader {
 public:
  /// Opens and validates `path`; `check_tokens` scans every token against vocab_size.
  explicit ShardReader(const std::string& path, bool check_tokens = true);
  const ShardHeader& header() const { return header_; }
  int64_t size() const { return header_.n_tokens; }
  /// Token at position i (no bounds check in release builds).
  uint32_t at(int64_t i) const {
    return wide_ ? reinterpret_cast<const uint32_t*>(tokens_)[i]
                 : reinterpret_cast<const uint16_t*>(tokens_)[i];
  }
  /// Copies tokens [begin, begin + n) into `out` as int64 (for embedding lookups).
  void copy_to(int64_t begin, int64_t n, int64_t* out) const;
  /// Copies the domain ids of tokens [begin, begin + n) into `out` (-1 when unlabelled).
  void copy_domains(int64_t begin, int64_t n, int64_t* out) const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  MappedFile file_;
  ShardHeader header_;
  const uint8_t* tokens_ = nullptr;
  bool wide_ = false;
};

}  // namespace mixdiff

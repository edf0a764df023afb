// token_shards: training data from a folder made by `mixdiff data prepare` (data/prepare.h).
//
// The training split is one token stream (the shards in order). Epoch e cuts it into N windows
// of seq_len tokens starting at a seeded offset o_e in [0, seq_len) and visits them in a seeded
// permutation; sequence k of the run is window perm_e[k mod N] of epoch e = k div N. Shards are
// memory-mapped; nothing is read twice into memory. Before training starts the source checks
// that every shard is whole, that all shards and the tokenizer folder carry the same tokenizer
// fingerprint, and (when the recipe has a `prepare` section) that the data was made from it.
#include <torch/torch.h>

#include <filesystem>

#include "core/errors.h"
#include "core/hash.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "train/data_source.h"

namespace mixdiff {
namespace {

// A list of shards read as one stream.
class Stream {
 public:
  void add(std::unique_ptr<ShardReader> s) {
    starts_.push_back(total_);
    total_ += s->size();
    shards_.push_back(std::move(s));
  }
  int64_t size() const { return total_; }
  void copy(int64_t begin, int64_t n, int64_t* out) const { walk(begin, n, out, false); }
  /// The domain id of each token instead of the token.
  void copy_domains(int64_t begin, int64_t n, int64_t* out) const { walk(begin, n, out, true); }

 private:
  void walk(int64_t begin, int64_t n, int64_t* out, bool domains) const {
    size_t i = std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin() - 1;
    while (n > 0) {
      const int64_t local = begin - starts_[i];
      const int64_t take = std::min(n, shards_[i]->size() - local);
      if (domains) {
        shards_[i]->copy_domains(local, take, out);
      } else {
        shards_[i]->copy_to(local, take, out);
      }
      out += take;
      begin += take;
      n -= take;
      ++i;
    }
  }

  std::vector<std::unique_ptr<ShardReader>> shards_;
  std::vector<int64_t> starts_;
  int64_t total_ = 0;
};

class TokenShards : public DataSource {
 public:
  explicit TokenShards(const ConfigNode& c)
      : path_(c.get<std::string>("path")),
        seq_len_(c.get<int64_t>("seq_len")),
        seed_(static_cast<uint64_t>(c.get<int64_t>("seed", 0))) {
    if (seq_len_ < 2) c.fail("seq_len", str("expected at least 2 tokens, got ", seq_len_));
    std::string spec;
    if (c.has("prepare")) spec = resolve_prepare_spec(c);
    info_ = read_dataset_info(path_);
    if (!spec.empty() && spec != info_.spec_yaml) {
      c.fail("prepare", str("'", path_, "' was prepared from a different spec; run `mixdiff data "
                            "prepare` with --force, or point data.path elsewhere"));
    }
    Tokenizer tok = Tokenizer::load(tokenizer_dir());
    if (tok.fingerprint() != info_.tokenizer_fingerprint || tok.vocab_size() != info_.vocab_size) {
      throw DataError(str(tokenizer_dir(), ": tokenizer (fingerprint ", tok.fingerprint(),
                          ", vocab ", tok.vocab_size(), ") does not match the dataset's (",
                          info_.tokenizer_fingerprint, ", vocab ", info_.vocab_size, ")"));
    }
    open(info_.train_shards, "train", &train_);
    open(info_.val_shards, "val", &val_);
    n_windows_ = (train_.size() - (seq_len_ - 1)) / seq_len_;
    if (n_windows_ < 1) {
      c.fail("seq_len", str("the training split has ", train_.size(),
                            " tokens, fewer than one window of ", seq_len_));
    }
    if (val_.size() < seq_len_) {
      c.fail("seq_len", str("the validation split has ", val_.size(),
                            " tokens, fewer than one window of ", seq_len_));
    }
  }

  int64_t seq_len() const override { return seq_len_; }
  int64_t vocab_size() const override { return info_.vocab_size; }
  int64_t eos_id() const override { return info_.eos_id; }
  std::string tokenizer_dir() const override { return path_ + "/tokenizer"; }
  std::string task_dataset() const override { return path_; }
  double val_unigram_entropy() const override { return info_.val_unigram_entropy; }

  at::Tensor train_batch(int64_t first, int64_t count) override {
    return train_windows(first, count, false);
  }
  at::Tensor train_domains(int64_t first, int64_t count) override {
    return info_.domains.empty() ? at::Tensor() : train_windows(first, count, true);
  }
  std::vector<std::string> domains() const override { return info_.domains; }

  at::Tensor val_sequences(int64_t n) override { return val_windows(n, false); }
  at::Tensor val_domains(int64_t n) override {
    return info_.domains.empty() ? at::Tensor() : val_windows(n, true);
  }

  std::string describe() const override {
    return str("token_shards ", path_, ": ", train_.size(), " train tokens (", n_windows_,
               " windows of ", seq_len_, "), ", val_.size(), " validation tokens, tokenizer ",
               info_.tokenizer_kind, " (", info_.vocab_size, ")");
  }

 private:
  /// Training sequences [first, first + count): their tokens, or their tokens' domains.
  at::Tensor train_windows(int64_t first, int64_t count, bool domains) {
    auto out = torch::empty({count, seq_len_}, torch::kLong);
    int64_t* p = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < count; ++i) {
      const int64_t k = first + i, epoch = k / n_windows_;
      const auto& perm = permutation(epoch);
      const int64_t offset = static_cast<int64_t>(splitmix64(seed_ ^ (0xabcdefULL + epoch)) %
                                                  static_cast<uint64_t>(seq_len_));
      const int64_t begin = offset + perm[k % n_windows_] * seq_len_;
      if (domains) {
        train_.copy_domains(begin, seq_len_, p + i * seq_len_);
      } else {
        train_.copy(begin, seq_len_, p + i * seq_len_);
      }
    }
    return out;
  }

  at::Tensor val_windows(int64_t n, bool domains) {
    const int64_t total = val_.size() / seq_len_;
    n = std::min(n, total);
    auto out = torch::empty({n, seq_len_}, torch::kLong);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t w = i * total / n;
      int64_t* dst = out.data_ptr<int64_t>() + i * seq_len_;
      if (domains) {
        val_.copy_domains(w * seq_len_, seq_len_, dst);
      } else {
        val_.copy(w * seq_len_, seq_len_, dst);
      }
    }
    return out;
  }

  void open(const std::vector<std::string>& names, const std::string& split, Stream* s) {
    if (names.empty()) throw DataError(str(path_, "/meta.json: no ", split, " shards listed"));
    for (const auto& n : names) {
      auto r = std::make_unique<ShardReader>(path_ + "/" + n);
      const auto& h = r->header();
      if (h.tokenizer_fingerprint != info_.tokenizer_fingerprint || h.vocab_size != info_.vocab_size) {
        throw DataError(str(r->path(), ": shard made with tokenizer ", h.tokenizer_fingerprint,
                            " (vocab ", h.vocab_size, "), dataset tokenizer is ",
                            info_.tokenizer_fingerprint, " (vocab ", info_.vocab_size, ")"));
      }
      if (h.n_domains != static_cast<int64_t>(info_.domains.size())) {
        throw DataError(str(r->path(), ": shard labels ", h.n_domains, " domains, meta.json names ",
                            info_.domains.size(), "; re-run `mixdiff data prepare --force`"));
      }
      s->add(std::move(r));
    }
  }

  // Fisher-Yates with a splitmix64 stream: portable, unlike std::shuffle's distribution.
  const std::vector<int64_t>& permutation(int64_t epoch) {
    if (epoch != perm_epoch_) {
      perm_.resize(static_cast<size_t>(n_windows_));
      for (int64_t i = 0; i < n_windows_; ++i) perm_[i] = i;
      uint64_t state = seed_ * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(epoch) + 1;
      for (int64_t i = n_windows_ - 1; i > 0; --i) {
        state = splitmix64(state);
        const int64_t j = static_cast<int64_t>(state % static_cast<uint64_t>(i + 1));
        std::swap(perm_[i], perm_[j]);
      }
      perm_epoch_ = epoch;
    }
    return perm_;
  }

  std::string path_;
  int64_t seq_len_;
  uint64_t seed_;
  DatasetInfo info_;
  Stream train_, val_;
  int64_t n_windows_ = 0;
  std::vector<int64_t> perm_;
  int64_t perm_epoch_ = -1;
};

MIXDIFF_REGISTER(data_sources_registry(), "token_shards",
                 "prepared token shards (mixdiff data prepare); keys: path, seq_len, seed, prepare",
                 [](const ConfigNode& c) -> std::unique_ptr<DataSource> {
                   return std::make_unique<TokenShards>(c);
                 });

}  // namespace
}  // namespace mixdiff

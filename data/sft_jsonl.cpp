// sft_jsonl: prompt/response pairs for supervised fine-tuning (data/sft.h).
//
// Recipe keys (data section):
//   kind: sft_jsonl
//   train: PATH.jsonl           training pairs
//   val: PATH.jsonl             held-out pairs (optional: else val_fraction of `train` by a
//                               seeded hash of the line number)
//   val_fraction: 0.05
//   from: DATASET               a prepared dataset: its tokenizer (unless `tokenizer`), the
//                               built-in tasks and the built-in pairs come from it
//   tokenizer: DIR              a folder with tokenizer.json (default: FROM/tokenizer)
//   seq_len: 64                 every pair is one row of this many tokens, EOS-padded
//   template: plain|chatml      how `messages` are rendered
//   seed: 0                     the order of the pairs (a seeded permutation per epoch)
//   builtin: wordnet            `mixdiff data prepare` writes `train` and `val` from FROM
// Training sequence k is pair perm_e[k mod N] of epoch e = k div N, so runs resume and
// data-parallel ranks split batches exactly as with token_shards.
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <ostream>
#include <sstream>

#include "core/errors.h"
#include "core/hash.h"
#include "core/fs.h"
#include "core/json_util.h"
#include "data/prepare.h"
#include "data/sft.h"
#include "data/tokenizer.h"
#include "train/data_source.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

struct Pair {
  std::string prompt, response;
};

// The prompt and response of one JSON line (`where` names the file and line on errors).
Pair parse_pair(const nlohmann::json& j, const std::string& where, const std::string& tmpl) {
  if (j.contains("prompt") || j.contains("response")) {
    if (!j.contains("prompt") || !j["prompt"].is_string() || !j.contains("response") ||
        !j["response"].is_string()) {
      throw DataError(str(where, ": expected string fields \"prompt\" and \"response\""));
    }
    return {j["prompt"].get<std::string>(), j["response"].get<std::string>()};
  }
  if (!j.contains("messages") || !j["messages"].is_array() || j["messages"].empty()) {
    throw DataError(str(where, ": expected {\"prompt\", \"response\"} or a non-empty "
                               "\"messages\" list"));
  }
  const auto& m = j["messages"];
  std::string prompt;
  for (size_t i = 0; i < m.size(); ++i) {
    if (!m[i].is_object() || !m[i].contains("role") || !m[i]["role"].is_string() ||
        !m[i].contains("content") || !m[i]["content"].is_string()) {
      throw DataError(str(where, ": message ", i, " needs string fields \"role\" and \"content\""));
    }
    const std::string role = m[i]["role"].get<std::string>();
    const std::string content = m[i]["content"].get<std::string>();
    if (role != "system" && role != "user" && role != "assistant") {
      throw DataError(str(where, ": message ", i, ": role '", role,
                          "' (expected system, user or assistant)"));
    }
    const bool last = i + 1 == m.size();
    if (last && role != "assistant") {
      throw DataError(str(where, ": the last message must be the assistant's (the response)"));
    }
    if (tmpl == "chatml") {
      if (last) return {prompt + "<|im_start|>assistant\n", content + "<|im_end|>"};
      prompt += "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
    } else {
      const std::string label = role == "system" ? "System" : role == "user" ? "User" : "Assistant";
      if (last) return {prompt + "Assistant:", " " + content};
      prompt += label + ": " + content + "\n";
    }
  }
  throw DataError(str(where, ": no response"));
}

class SftJsonl : public DataSource {
 public:
  explicit SftJsonl(const ConfigNode& c)
      : seq_len_(c.get<int64_t>("seq_len")),
        seed_(static_cast<uint64_t>(c.get<int64_t>("seed", 0))),
        from_(c.get<std::string>("from", "")),
        template_(c.get<std::string>("template", "plain")) {
    if (seq_len_ < 2) c.fail("seq_len", str("expected at least 2 tokens, got ", seq_len_));
    if (template_ != "plain" && template_ != "chatml") {
      c.fail("template", "expected plain or chatml, got '" + template_ + "'");
    }
    tokenizer_dir_ = c.get<std::string>("tokenizer", from_.empty() ? "" : from_ + "/tokenizer");
    if (tokenizer_dir_.empty()) {
      c.fail("tokenizer", "expected a folder with tokenizer.json (or data.from: a prepared "
                          "dataset whose tokenizer to use)");
    }
    if (c.has("builtin")) {
      const std::string b = c.get<std::string>("builtin");
      if (b != "wordnet") c.fail("builtin", "expected wordnet, got '" + b + "'");
    }
    const Tokenizer tok = Tokenizer::load(tokenizer_dir_);
    vocab_ = tok.vocab_size();
    eos_ = tok.eos_id();
    const std::string train_path = c.get<std::string>("train");
    const std::string val_path = c.get<std::string>("val", "");
    const double val_fraction = c.get<double>("val_fraction", 0.05);
    if (!(val_fraction > 0 && val_fraction < 0.5)) {
      c.fail("val_fraction", str("expected a fraction in (0, 0.5), got ", val_fraction));
    }
    auto missing = [&](const std::string& p, const char* key) {
      if (fs::exists(p)) return;
      const std::string hint = c.has("builtin") ? "; run `mixdiff data prepare RECIPE` to make it"
                                                : "";
      c.fail(key, str("'", p, "' not found", hint));
    };
    missing(train_path, "train");
    if (!val_path.empty()) missing(val_path, "val");
    read(train_path, tok, val_path.empty() ? val_fraction : 0.0);
    if (!val_path.empty()) read(val_path, tok, -1.0);
    if (train_.n == 0) {
      c.fail("train", str("no pair of '", train_path, "' fits seq_len ", seq_len_, " (",
                          skipped_, " too long)"));
    }
    if (val_.n == 0) {
      c.fail(val_path.empty() ? "val_fraction" : "val", "no held-out pair (none fits seq_len or "
                                                        "the split is empty)");
    }
  }

  int64_t seq_len() const override { return seq_len_; }
  int64_t vocab_size() const override { return vocab_; }
  int64_t eos_id() const override { return eos_; }
  std::string tokenizer_dir() const override { return tokenizer_dir_; }
  std::string task_dataset() const override { return from_; }

  at::Tensor train_batch(int64_t first, int64_t count) override {
    return rows(train_, train_rows(first, count), false);
  }
  at::Tensor train_response(int64_t first, int64_t count) override {
    return rows(train_, train_rows(first, count), true);
  }
  at::Tensor val_sequences(int64_t n) override { return rows(val_, val_rows(n), false); }
  at::Tensor val_response(int64_t n) override { return rows(val_, val_rows(n), true); }

  std::string describe() const override {
    return str("sft_jsonl: ", train_.n, " training and ", val_.n, " held-out pairs as rows of ",
               seq_len_, " tokens (", train_.prompt_tokens + train_.response_tokens,
               " prompt+response tokens in training, ", train_.response_tokens,
               " of them response), ", skipped_, " pairs too long skipped");
  }

 private:
  struct Split {
    std::vector<int64_t> tokens;  // n x seq_len
    std::vector<uint8_t> response;
    int64_t n = 0, prompt_tokens = 0, response_tokens = 0;
  };

  // Reads a file; `val_fraction` > 0 sends that share of its lines to the held-out split, 0
  // keeps them all for training, < 0 reads the held-out file.
  void read(const std::string& path, const Tokenizer& tok, double val_fraction) {
    for_each_json_line<DataError>(read_file(path, "SFT pairs file"), path,
                                  [&](const nlohmann::json& j, int64_t n) {
      const Pair p = parse_pair(j, str(path, " line ", n), template_);
      bool to_val = val_fraction < 0;
      if (val_fraction > 0) {
        const uint64_t h = splitmix64(seed_ * 0x632be59bd9b4e019ULL ^ static_cast<uint64_t>(n));
        to_val = static_cast<double>(h >> 11) * 0x1.0p-53 < val_fraction;
      }
      auto [prompt, response] = encode_pair(tok, p.prompt, p.response);
      const int64_t P = static_cast<int64_t>(prompt.size()), R = static_cast<int64_t>(response.size());
      if (P + R + 1 > seq_len_) {
        ++skipped_;
        return;
      }
      Split& s = to_val ? val_ : train_;
      for (int32_t t : prompt) s.tokens.push_back(t);
      for (int32_t t : response) s.tokens.push_back(t);
      for (int64_t i = P + R; i < seq_len_; ++i) s.tokens.push_back(eos_);
      for (int64_t i = 0; i < seq_len_; ++i) s.response.push_back(i >= P ? 1 : 0);
      s.prompt_tokens += P;
      s.response_tokens += R;
      ++s.n;
    });
  }

  std::vector<int64_t> train_rows(int64_t first, int64_t count) {
    std::vector<int64_t> out;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t k = first + i, epoch = k / train_.n;
      out.push_back(permutation(epoch)[static_cast<size_t>(k % train_.n)]);
    }
    return out;
  }

  std::vector<int64_t> val_rows(int64_t n) const {
    n = std::min(n, val_.n);
    std::vector<int64_t> out;
    for (int64_t i = 0; i < n; ++i) out.push_back(i * val_.n / n);
    return out;
  }

  at::Tensor rows(const Split& s, const std::vector<int64_t>& idx, bool response) const {
    const int64_t n = static_cast<int64_t>(idx.size());
    if (response) {
      auto out = torch::empty({n, seq_len_}, torch::kBool);
      bool* p = out.data_ptr<bool>();
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < seq_len_; ++j) {
          p[i * seq_len_ + j] = s.response[static_cast<size_t>(idx[static_cast<size_t>(i)] * seq_len_ + j)] != 0;
        }
      }
      return out;
    }
    auto out = torch::empty({n, seq_len_}, torch::kLong);
    int64_t* p = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      std::copy_n(s.tokens.begin() + idx[static_cast<size_t>(i)] * seq_len_, seq_len_,
                  p + i * seq_len_);
    }
    return out;
  }

  const std::vector<int64_t>& permutation(int64_t epoch) {
    if (epoch != perm_epoch_) {
      perm_.resize(static_cast<size_t>(train_.n));
      for (int64_t i = 0; i < train_.n; ++i) perm_[static_cast<size_t>(i)] = i;
      uint64_t state = seed_ * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(epoch) + 1;
      for (int64_t i = train_.n - 1; i > 0; --i) {
        state = splitmix64(state);
        const int64_t j = static_cast<int64_t>(state % static_cast<uint64_t>(i + 1));
        std::swap(perm_[static_cast<size_t>(i)], perm_[static_cast<size_t>(j)]);
      }
      perm_epoch_ = epoch;
    }
    return perm_;
  }

  int64_t seq_len_;
  uint64_t seed_;
  std::string from_, template_, tokenizer_dir_;
  int64_t vocab_ = 0, eos_ = 0, skipped_ = 0;
  Split train_, val_;
  std::vector<int64_t> perm_;
  int64_t perm_epoch_ = -1;
};

MIXDIFF_REGISTER(data_sources_registry(), "sft_jsonl",
                 "prompt/response pairs for SFT (JSON Lines, EOS-padded rows; data/sft.h); keys: "
                 "train, val, val_fraction, from, tokenizer, seq_len, template, seed, builtin",
                 [](const ConfigNode& c) -> std::unique_ptr<DataSource> {
                   return std::make_unique<SftJsonl>(c);
                 });

}  // namespace

void prepare_sft_pairs(const ConfigNode& c, bool force, std::ostream& log) {
  const std::string builtin = c.get<std::string>("builtin");
  if (builtin != "wordnet") c.fail("builtin", "expected wordnet, got '" + builtin + "'");
  const std::string from = c.get<std::string>("from", "");
  if (from.empty()) c.fail("from", "expected the prepared dataset to make the pairs from");
  const std::string train = c.get<std::string>("train");
  const std::string val = c.get<std::string>("val", "");
  if (val.empty()) c.fail("val", "expected the file for the held-out pairs");
  if (!force && fs::exists(train) && fs::exists(val)) {
    log << "data: " << train << " and " << val << " exist; use --force to rebuild\n";
    return;
  }
  std::string out_train, out_val;
  int64_t n_train = 0, n_val = 0;
  for_each_split_document(from, [&](const SplitDocument& d) {
    const auto corpus = d.fields.find("corpus");
    if (corpus == d.fields.end() || corpus->second != "wordnet") return;
    const std::string lemmas = d.fields.at("lemmas");
    const std::string word = lemmas.substr(0, lemmas.find(", "));
    const std::string def = d.fields.at("definition");
    if (def.empty()) return;
    const std::string line =
        nlohmann::json{{"prompt", word + " (" + d.fields.at("pos") + "):"},
                       {"response", " " + def}}
            .dump() +
        "\n";
    (d.validation ? out_val : out_train) += line;
    ++(d.validation ? n_val : n_train);
  });
  if (n_train == 0 || n_val == 0) {
    c.fail("from", str("'", from, "' has no WordNet documents in ",
                       n_train == 0 ? "its training split" : "its validation split",
                       " (prepare it with the wordnet corpus)"));
  }
  for (const auto& p : {train, val}) {
    const auto parent = fs::path(p).parent_path();
    if (!parent.empty()) fs::create_directories(parent);
  }
  write_file_atomic(train, out_train);
  write_file_atomic(val, out_val);
  log << "data: wrote " << n_train << " training pairs to " << train << " and " << n_val
      << " held-out pairs to " << val << " (WordNet synsets of " << from << ", by its split)\n";
}

}  // namespace mixdiff

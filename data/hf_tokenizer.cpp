// Hugging Face tokenizer.json <-> MixDiff tokenizer (byte-level BPE only), data/tokenizer.h.
//
// What is read: model {type: BPE, vocab, merges ("a b" strings or [a, b] pairs), byte_fallback
// false, ignore_merges, no dropout, no continuing_subword_prefix / end_of_word_suffix},
// pre_tokenizer ByteLevel {use_regex: true, add_prefix_space: false} (GPT-2's regex) or Sequence
// [Split {Regex, behavior Isolated, invert false}, ByteLevel {use_regex: false}], added_tokens,
// normalizer null or NFC. The post-processor (a BOS that Llama-3's template adds) is not applied:
// MixDiff's sequences carry no BOS.
#include <algorithm>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/fs.h"
#include "core/json_util.h"
#include "data/tokenizer.h"

namespace mixdiff {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

[[noreturn]] void refuse(const std::string& path, const std::string& field, const std::string& why) {
  throw DataError(str(path, ": ", field, ": ", why));
}

/// Checks a ByteLevel pre-tokenizer entry; returns its use_regex.
bool byte_level(const json& p, const std::string& path, const std::string& field) {
  if (p.value("add_prefix_space", false)) {
    refuse(path, field + ".add_prefix_space", "true is not supported (expected false)");
  }
  return p.value("use_regex", true);
}

}  // namespace

namespace {
Tokenizer read_hf_tokenizer_json(const std::string& path, const std::string& eos_in,
                                 int64_t vocab_size, std::vector<std::string>* notes,
                                 int64_t eos_id) {
  const json doc = read_json_file(path, "tokenizer file");
  if (!doc.is_object() || !doc.contains("model") || !doc["model"].is_object()) {
    refuse(path, "model", "expected an object");
  }
  const json& m = doc["model"];
  if (m.value("type", std::string()) != "BPE") {
    refuse(path, "model.type", str("expected BPE (byte-level), got ", m.value("type", json()).dump()));
  }
  if (m.value("byte_fallback", false)) {
    refuse(path, "model.byte_fallback", "SentencePiece-style byte fallback is not supported");
  }
  if (!m.value("dropout", json()).is_null()) refuse(path, "model.dropout", "expected null");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (m.contains(k) && m[k].is_string() && !m[k].get<std::string>().empty()) {
      refuse(path, str("model.", k), "expected empty (byte-level BPE)");
    }
  }
  const bool ignore_merges = m.value("ignore_merges", false);
  // Normalizer.
  const json norm = doc.value("normalizer", json());
  if (!norm.is_null()) {
    const std::string t = norm.value("type", std::string());
    if (t != "NFC") refuse(path, "normalizer.type", str("'", t, "' is not supported (null or NFC)"));
    if (notes) {
      notes->push_back("normalizer NFC is not applied: text already in NFC encodes identically");
    }
  }
  // Pre-tokenizer.
  std::string pattern;
  const json pre = doc.value("pre_tokenizer", json());
  const std::string pt = pre.is_object() ? pre.value("type", std::string()) : std::string();
  if (pt == "ByteLevel") {
    if (!byte_level(pre, path, "pre_tokenizer")) {
      refuse(path, "pre_tokenizer.use_regex", "false without a Split before it splits nothing");
    }
    pattern.clear();  // GPT-2's
  } else if (pt == "Sequence") {
    const json& seq = pre.value("pretokenizers", json::array());
    if (seq.size() != 2 || seq[0].value("type", "") != "Split" || seq[1].value("type", "") != "ByteLevel") {
      refuse(path, "pre_tokenizer.pretokenizers", "expected [Split, ByteLevel]");
    }
    const json& sp = seq[0];
    if (!sp.contains("pattern") || !sp["pattern"].is_object() || !sp["pattern"].contains("Regex")) {
      refuse(path, "pre_tokenizer.pretokenizers[0].pattern", "expected {\"Regex\": ...}");
    }
    pattern = sp["pattern"]["Regex"].get<std::string>();
    if (sp.value("behavior", std::string()) != "Isolated") {
      refuse(path, "pre_tokenizer.pretokenizers[0].behavior", "expected Isolated");
    }
    if (sp.value("invert", false)) refuse(path, "pre_tokenizer.pretokenizers[0].invert", "expected false");
    if (byte_level(seq[1], path, "pre_tokenizer.pretokenizers[1]")) {
      refuse(path, "pre_tokenizer.pretokenizers[1].use_regex", "expected false after a Split");
    }
  } else {
    refuse(path, "pre_tokenizer.type", str("'", pt, "' is not supported (ByteLevel, or Sequence of "
                                                    "Split and ByteLevel)"));
  }
  // Vocabulary, added tokens, merges.
  std::unordered_map<std::string, int32_t> encoder;
  if (!m.contains("vocab") || !m["vocab"].is_object()) refuse(path, "model.vocab", "expected an object");
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    encoder[it.key()] = it.value().get<int32_t>();
  }
  for (const json& a : doc.value("added_tokens", json::array())) {
    const std::string content = a.value("content", std::string());
    const int32_t id = a.value("id", -1);
    if (id == vocab_size && content == "<|mask|>") continue;  // the [MASK] of an export-hf folder
    auto it = encoder.find(content);
    if (it != encoder.end() && it->second != id) {
      refuse(path, "added_tokens", str("'", content, "' has id ", id, " and ", it->second, " in model.vocab"));
    }
    encoder[content] = id;
  }
  int32_t max_id = -1;
  std::vector<bool> used;
  for (const auto& kv : encoder) max_id = std::max(max_id, kv.second);
  if (max_id >= vocab_size) {
    refuse(path, "model.vocab", str("token id ", max_id, " is beyond the model's vocab_size ", vocab_size));
  }
  used.assign(static_cast<size_t>(vocab_size), false);
  for (const auto& kv : encoder) {
    if (kv.second >= 0) used[static_cast<size_t>(kv.second)] = true;
  }
  int64_t reserved = 0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    if (!used[static_cast<size_t>(i)]) {
      encoder[str("<|reserved_", i, "|>")] = static_cast<int32_t>(i);
      ++reserved;
    }
  }
  if (reserved > 0 && notes) {
    notes->push_back(str(reserved, " ids that the tokenizer does not name (the model's vocabulary "
                                   "is padded) became reserved tokens"));
  }
  std::vector<std::pair<std::string, std::string>> merges;
  for (const json& mg : m.value("merges", json::array())) {
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        refuse(path, "model.merges", str("'", s, "': expected two symbols separated by one space"));
      }
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (mg.is_array() && mg.size() == 2) {
      merges.emplace_back(mg[0].get<std::string>(), mg[1].get<std::string>());
    } else {
      refuse(path, "model.merges", "expected \"a b\" strings or [a, b] pairs");
    }
  }
  std::string eos = eos_in;
  if (eos.empty() && eos_id >= 0) {
    for (const auto& kv : encoder) {
      if (kv.second == eos_id) eos = kv.first;
    }
    if (eos.empty()) refuse(path, "eos", str("no token has the end-of-text id ", eos_id));
  }
  if (eos.empty()) {
    const std::string cfg = (fs::path(path).parent_path() / "tokenizer_config.json").string();
    if (fs::exists(cfg)) {
      const json c = read_json_file(cfg, "tokenizer config");
      if (c.is_object() && c.contains("eos_token")) {
        const json& e = c["eos_token"];
        eos = e.is_string() ? e.get<std::string>() : e.value("content", std::string());
      }
    }
  }
  if (eos.empty()) {
    refuse(path, "eos", "no end-of-text token: config.json has no eos_token_id and "
                        "tokenizer_config.json no eos_token");
  }
  ByteLevelBpe bpe(std::move(encoder), std::move(merges), eos);
  bpe.set_pretokenizer(pattern, ignore_merges);
  return Tokenizer("hf_bpe", std::move(bpe));
}
}  // namespace

Tokenizer read_hf_tokenizer(const std::string& path, const std::string& eos, int64_t vocab_size,
                            std::vector<std::string>* notes, int64_t eos_id) {
  try {
    return read_hf_tokenizer_json(path, eos, vocab_size, notes, eos_id);
  } catch (const json::exception& e) {  // a value of the wrong JSON type somewhere
    throw DataError(str(path, ": unexpected JSON value: ", e.what()));
  }
}

void write_hf_tokenizer(const Tokenizer& tok, const std::string& dir, const std::string& mask_token) {
  const ByteLevelBpe& bpe = tok.bpe();
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  for (int32_t i = 0; i < bpe.vocab_size(); ++i) vocab[bpe.token_symbols(i)] = i;
  nlohmann::ordered_json merges = nlohmann::ordered_json::array();
  for (const auto& [a, b] : bpe.merges()) merges.push_back({a, b});
  auto added = [](int32_t id, const std::string& content) {
    return nlohmann::ordered_json{{"id", id},          {"content", content}, {"single_word", false},
                                  {"lstrip", false},   {"rstrip", false},    {"normalized", false},
                                  {"special", true}};
  };
  nlohmann::ordered_json added_tokens = nlohmann::ordered_json::array();
  const std::string eos = bpe.token_symbols(bpe.eos_id());
  added_tokens.push_back(added(bpe.eos_id(), eos));
  if (!mask_token.empty()) added_tokens.push_back(added(bpe.vocab_size(), mask_token));
  const nlohmann::ordered_json byte_level = {{"type", "ByteLevel"},
                                             {"add_prefix_space", false},
                                             {"trim_offsets", false},
                                             {"use_regex", true}};
  nlohmann::ordered_json pre;
  if (bpe.pattern().empty()) {
    pre = byte_level;
  } else {
    nlohmann::ordered_json bl = byte_level;
    bl["use_regex"] = false;
    pre = {{"type", "Sequence"},
           {"pretokenizers",
            {{{"type", "Split"}, {"pattern", {{"Regex", bpe.pattern()}}}, {"behavior", "Isolated"},
              {"invert", false}},
             bl}}};
  }
  nlohmann::ordered_json doc;
  doc["version"] = "1.0";
  doc["truncation"] = nullptr;
  doc["padding"] = nullptr;
  doc["added_tokens"] = added_tokens;
  doc["normalizer"] = nullptr;
  doc["pre_tokenizer"] = pre;
  doc["post_processor"] = nullptr;
  doc["decoder"] = byte_level;
  doc["model"] = {{"type", "BPE"},          {"dropout", nullptr},
                  {"unk_token", nullptr},   {"continuing_subword_prefix", ""},
                  {"end_of_word_suffix", ""}, {"fuse_unk", false},
                  {"byte_fallback", false}, {"ignore_merges", bpe.ignore_merges()},
                  {"vocab", vocab},         {"merges", merges}};
  fs::create_directories(dir);
  write_file_atomic((fs::path(dir) / "tokenizer.json").string(), doc.dump(2) + "\n");
  nlohmann::ordered_json cfg = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                                {"eos_token", eos},
                                {"model_max_length", 1000000000}};
  if (!mask_token.empty()) cfg["mask_token"] = mask_token;
  write_file_atomic((fs::path(dir) / "tokenizer_config.json").string(), cfg.dump(2) + "\n");
}

}  // namespace mixdiff

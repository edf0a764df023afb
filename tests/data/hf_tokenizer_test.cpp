// Tests of the pre-tokenizer pattern, ignore_merges and the Hugging Face tokenizer.json reader
// and writer (data/hf_tokenizer.cpp). Against the `tokenizers` library itself:
// E2EHuggingFace (tests/interop/hf_test.cpp).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <unordered_map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "data/tokenizer.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const char* const kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

std::string scratch(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("mixdiff_hf_tok_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

std::vector<std::string> pieces(const Pretokenizer& p, const std::string& text) {
  std::vector<std::string> out;
  for (auto v : p.split(text)) out.emplace_back(v);
  return out;
}

ByteLevelBpe trained() {
  BpeTrainer t;
  for (int i = 0; i < 20; ++i) {
    t.add_text("In the beginning God created the heaven and the earth. 12345 naïve café\n");
  }
  return t.train(300);
}

TEST(UnitPretokenizer, AnotherPatternSplitsDigitsOneByOneLikeQwen) {
  Pretokenizer gpt2, qwen(kQwenPattern);
  EXPECT_EQ(pieces(gpt2, "abc 123"), (std::vector<std::string>{"abc", " 123"}));
  EXPECT_EQ(pieces(qwen, "abc 123"), (std::vector<std::string>{"abc", " ", "1", "2", "3"}));
  EXPECT_EQ(pieces(qwen, "It's"), (std::vector<std::string>{"It", "'s"}));
  try {
    Pretokenizer bad("(unclosed");
    FAIL() << "a bad pattern was accepted";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("(unclosed"), std::string::npos) << e.what();
  }
}

TEST(UnitTokenizer, PatternAndIgnoreMergesTravelWithTheFolderAndTheFingerprint) {
  ByteLevelBpe bpe = trained();
  const std::string base = bpe.fingerprint();
  bpe.set_pretokenizer("", false);  // GPT-2's: the tables' fingerprint stays
  EXPECT_EQ(bpe.fingerprint(), base);
  bpe.set_pretokenizer(kQwenPattern, false);
  EXPECT_NE(bpe.fingerprint(), base);
  EXPECT_EQ(bpe.encode("12").size(), 2u);  // digits one by one
  Tokenizer tok("hf_bpe", std::move(bpe));
  const std::string dir = scratch("folder");
  tok.save(dir);
  Tokenizer back = Tokenizer::load(dir);
  EXPECT_EQ(back.bpe().pattern(), kQwenPattern);
  EXPECT_EQ(back.fingerprint(), tok.fingerprint());
  EXPECT_EQ(back.encode("The earth 2024"), tok.encode("The earth 2024"));
  fs::remove_all(dir);
}

TEST(UnitByteLevelBpe, IgnoreMergesTakesAWholeTokenWithoutMerging) {
  // "abc" is a token no merge reaches: merges give three bytes, ignore_merges the token.
  std::unordered_map<std::string, int32_t> enc;
  int32_t id = 0;
  for (const char* s : {"a", "b", "c", "abc", "<|endoftext|>"}) enc[s] = id++;
  ByteLevelBpe bpe(enc, {}, "<|endoftext|>");
  EXPECT_EQ(bpe.encode("abc"), (std::vector<int32_t>{0, 1, 2}));
  bpe.set_pretokenizer("", true);
  EXPECT_EQ(bpe.encode("abc"), (std::vector<int32_t>{3}));
  EXPECT_EQ(bpe.encode("ab"), (std::vector<int32_t>{0, 1}));
}

TEST(UnitHfTokenizer, WriteThenReadKeepsVocabularyMergesAndPattern) {
  for (const std::string pattern : {std::string(), std::string(kQwenPattern)}) {
    ByteLevelBpe bpe = trained();
    bpe.set_pretokenizer(pattern, false);
    Tokenizer tok("byte_bpe", std::move(bpe));
    const std::string dir = scratch("rw");
    write_hf_tokenizer(tok, dir, "<|mask|>");
    std::vector<std::string> notes;
    Tokenizer back = read_hf_tokenizer(dir + "/tokenizer.json", "", tok.vocab_size(), &notes);
    EXPECT_EQ(back.vocab_size(), tok.vocab_size());  // the [MASK] of an export is not a token
    EXPECT_EQ(back.fingerprint(), tok.fingerprint());
    EXPECT_EQ(back.eos_id(), tok.eos_id());
    const std::string text = "In the beginning, 2024 naïve cafés!\n";
    EXPECT_EQ(back.encode(text), tok.encode(text));
    EXPECT_TRUE(notes.empty());
    fs::remove_all(dir);
  }
}

TEST(UnitHfTokenizer, PadsIdsNobodyNamesWithReservedTokens) {
  Tokenizer tok("byte_bpe", trained());
  const std::string dir = scratch("pad");
  write_hf_tokenizer(tok, dir, "");
  std::vector<std::string> notes;
  const int64_t V = tok.vocab_size() + 5;
  Tokenizer back = read_hf_tokenizer(dir + "/tokenizer.json", "<|endoftext|>", V, &notes);
  EXPECT_EQ(back.vocab_size(), V);
  EXPECT_EQ(back.decode({static_cast<int32_t>(V - 1)}), "<|reserved_" + std::to_string(V - 1) + "|>");
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("5 ids"), std::string::npos) << notes[0];
  // A tokenizer larger than the model is refused.
  EXPECT_THROW(read_hf_tokenizer(dir + "/tokenizer.json", "<|endoftext|>", tok.vocab_size() - 1, nullptr),
               DataError);
  fs::remove_all(dir);
}

TEST(UnitHfTokenizer, RefusesWhatItCannotFollowNamingTheField) {
  Tokenizer tok("byte_bpe", trained());
  const std::string dir = scratch("bad");
  write_hf_tokenizer(tok, dir, "");
  const json good = json::parse(std::ifstream(dir + "/tokenizer.json"));
  struct Case {
    std::function<void(json&)> edit;
    const char* field;
  };
  const Case cases[] = {
      {[](json& j) { j["model"]["type"] = "Unigram"; }, "model.type"},
      {[](json& j) { j["model"]["byte_fallback"] = true; }, "model.byte_fallback"},
      {[](json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }, "normalizer.type"},
      {[](json& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}}; }, "pre_tokenizer.type"},
      {[](json& j) { j["pre_tokenizer"]["add_prefix_space"] = true; }, "pre_tokenizer.add_prefix_space"},
      {[](json& j) { j["model"]["merges"][0] = "a b c"; }, "model.merges"},
  };
  for (const auto& c : cases) {
    json j = good;
    c.edit(j);
    std::ofstream(dir + "/tokenizer.json") << j.dump();
    try {
      read_hf_tokenizer(dir + "/tokenizer.json", "<|endoftext|>", tok.vocab_size(), nullptr);
      ADD_FAILURE() << c.field << " was accepted";
    } catch (const DataError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(dir + "/tokenizer.json: " + c.field), std::string::npos) << m;
    }
  }
  // NFC is accepted with a note.
  json j = good;
  j["normalizer"] = {{"type", "NFC"}};
  std::ofstream(dir + "/tokenizer.json") << j.dump();
  std::vector<std::string> notes;
  read_hf_tokenizer(dir + "/tokenizer.json", "<|endoftext|>", tok.vocab_size(), &notes);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("NFC"), std::string::npos);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace mixdiff

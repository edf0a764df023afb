// Tests of data/tokenizer: GPT-2 pre-tokenisation, byte-level BPE encode/decode against a
// hand-computed fixture and a naive reference bpe(), training, file round trips and the error
// messages for malformed tokenizer files.
#include "data/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/errors.h"

#ifndef MIXDIFF_FIXTURES_DIR
#define MIXDIFF_FIXTURES_DIR "tests/fixtures"
#endif

namespace mixdiff {
namespace {

namespace fs = std::filesystem;
using Pieces = std::vector<std::string>;

std::string fixtures_dir() {
  const char* env = std::getenv("MIXDIFF_TEST_FIXTURES");
  return env && *env ? env : MIXDIFF_FIXTURES_DIR;
}

std::string tiny_dir() { return fixtures_dir() + "/gpt2_tiny"; }

// A fresh folder per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() / ("mixdiff_tokenizer_test_" + std::to_string(::getpid()) +
                                         "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

void write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Pieces split(const Pretokenizer& p, std::string_view text) {
  Pieces out;
  for (std::string_view piece : p.split(text)) out.emplace_back(piece);
  return out;
}

// Runs `fn`, expects a DataError whose one-line message contains every `needle`.
void expect_data_error(const std::function<void()>& fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "expected DataError, nothing was thrown";
  } catch (const DataError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    // Valid UTF-8 even for binary input (dump() throws on invalid UTF-8).
    EXPECT_NO_THROW(nlohmann::json(msg).dump()) << msg;
    for (const std::string& needle : needles) {
      EXPECT_NE(msg.find(needle), std::string::npos) << "'" << needle << "' not in: " << msg;
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected DataError, got: " << e.what();
  }
}

// --- Independent reference: GPT-2's encoder.py transcribed literally (string symbols, one
// full pass per merge). It is the slow, obvious twin of ByteLevelBpe's heap-based bpe().

std::vector<std::string> reference_byte_symbols() {
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  std::vector<int> cs = bs;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
      bs.push_back(b);
      cs.push_back(256 + n++);
    }
  }
  std::vector<std::string> symbols(256);
  for (size_t i = 0; i < bs.size(); ++i) {
    const int cp = cs[i];
    std::string& s = symbols[bs[i]];
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return symbols;
}

struct ReferenceBpe {
  std::map<std::string, int> encoder;
  std::map<std::pair<std::string, std::string>, int> ranks;
  std::vector<std::string> byte_symbols = reference_byte_symbols();
  Pretokenizer pretokenizer;

  explicit ReferenceBpe(const std::string& dir) {
    const auto doc = nlohmann::json::parse(read_file(dir + "/encoder.json"));
    for (auto it = doc.begin(); it != doc.end(); ++it) encoder[it.key()] = it.value().get<int>();
    std::istringstream lines(read_file(dir + "/vocab.bpe"));
    std::string line;
    std::getline(lines, line);  // "#version: 0.2"
    int rank = 0;
    while (std::getline(lines, line)) {
      if (line.empty()) continue;
      const size_t sp = line.find(' ');
      ranks[{line.substr(0, sp), line.substr(sp + 1)}] = rank++;
    }
  }

  std::vector<std::string> bpe(std::vector<std::string> word) const {
    while (word.size() > 1) {
      int best = -1;
      std::pair<std::string, std::string> bigram;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        auto it = ranks.find({word[i], word[i + 1]});
        if (it != ranks.end() && (best < 0 || it->second < best)) {
          best = it->second;
          bigram = it->first;
        }
      }
      if (best < 0) break;
      std::vector<std::string> merged;
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == bigram.first && word[i + 1] == bigram.second) {
          merged.push_back(bigram.first + bigram.second);
          i += 2;
        } else {
          merged.push_back(word[i++]);
        }
      }
      word = std::move(merged);
    }
    return word;
  }

  std::vector<int32_t> encode(std::string_view text) const {
    std::vector<int32_t> ids;
    for (std::string_view piece : pretokenizer.split(text)) {
      std::vector<std::string> word;
      for (unsigned char c : piece) word.push_back(byte_symbols[c]);
      for (const std::string& symbol : bpe(word)) ids.push_back(encoder.at(symbol));
    }
    return ids;
  }
};

// Deterministic English-like corpus: a few real words (some non-ASCII) plus words made of random
// syllables, Zipf-distributed, so that a 600-symbol vocabulary has enough pairs to learn while the
// tests stay fast.
std::string make_corpus() {
  static const char* const kWords[] = {"the",    "and",    "of",    "to",     "in",     "that",
                                       "it's",   "don't",  "we'll", "lower",  "lowest", "newer",
                                       "widest", "café",   "déjà",  "naïve",  "über",   "日本語",
                                       "2026",   "3.14",   "(see",  "above)", "--",     "\"quote\"",
                                       "end.",   "x86_64", "😀",     "a\tb",   "C++17",  "e-mail"};
  static const char* const kSyllables[] = {"ka", "to", "ri",  "men", "sa",  "lo",   "qui", "der",
                                           "on", "ex", "pha", "str", "ing", "tion", "ly",  "ba"};
  const size_t n_words = sizeof(kWords) / sizeof(kWords[0]);
  const size_t n_syll = sizeof(kSyllables) / sizeof(kSyllables[0]);
  std::mt19937 rng(1234);
  std::vector<std::string> vocab(kWords, kWords + n_words);
  for (int i = 0; i < 400; ++i) {
    std::string w;
    const int syllables = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < syllables; ++k) w += kSyllables[rng() % n_syll];
    if (rng() % 5 == 0) w[0] = static_cast<char>(w[0] - 'a' + 'A');
    vocab.push_back(w);
  }
  std::string text;
  for (int line = 0; line < 800; ++line) {
    const int len = 3 + static_cast<int>(rng() % 12);
    for (int w = 0; w < len; ++w) {
      if (w > 0) text += (rng() % 17 == 0) ? "  " : " ";
      // Product of two uniforms: low indices are much more frequent.
      const size_t idx = (rng() % vocab.size()) * (rng() % vocab.size()) / vocab.size();
      text += vocab[idx];
    }
    text += (line % 7 == 0) ? "\n\n" : "\n";
  }
  return text;
}

// The slow twin of BpeTrainer::train: recount every pair of every word before each merge, take
// the best by (count desc, left id asc, right id asc), skip pairs that would spell an existing
// symbol or the eos token, and rewrite every word left to right. Returns the merges as byte
// strings; `skips` counts the skipped pairs so that tests can check that rule was exercised.
std::vector<std::pair<std::string, std::string>> naive_train(const std::string& text,
                                                             int32_t vocab_size,
                                                             const std::string& eos, int* skips) {
  Pretokenizer pretokenizer;
  std::map<std::string, int64_t> counts;
  for (std::string_view piece : pretokenizer.split(text)) ++counts[std::string(piece)];
  std::vector<std::pair<std::vector<int>, int64_t>> words;
  for (const auto& [piece, count] : counts) {
    std::vector<int> syms;
    for (unsigned char c : piece) syms.push_back(c);
    words.emplace_back(syms, count);
  }
  std::vector<std::string> symbol;
  for (int b = 0; b < 256; ++b) symbol.emplace_back(1, static_cast<char>(b));
  const std::vector<std::string> alphabet = reference_byte_symbols();
  auto spelled = [&](const std::string& bytes) {
    std::string out;
    for (unsigned char c : bytes) out += alphabet[c];
    return out;
  };
  std::set<std::pair<int, int>> banned;
  std::vector<std::pair<std::string, std::string>> merges;
  *skips = 0;
  while (static_cast<int32_t>(symbol.size()) < vocab_size - 1) {
    std::map<std::pair<int, int>, int64_t> pairs;
    for (const auto& [syms, count] : words) {
      for (size_t i = 0; i + 1 < syms.size(); ++i) pairs[{syms[i], syms[i + 1]}] += count;
    }
    std::pair<int, int> best{-1, -1};
    int64_t best_count = 0;
    for (const auto& [pair, count] : pairs) {  // map order = (left, right) ascending
      if (count > best_count && !banned.count(pair)) {
        best = pair;
        best_count = count;
      }
    }
    if (best_count == 0) break;
    const std::string merged = symbol[best.first] + symbol[best.second];
    if (std::find(symbol.begin(), symbol.end(), merged) != symbol.end() || spelled(merged) == eos) {
      banned.insert(best);
      ++*skips;
      continue;
    }
    const int id = static_cast<int>(symbol.size());
    symbol.push_back(merged);
    merges.emplace_back(symbol[best.first], symbol[best.second]);
    for (auto& [syms, count] : words) {
      std::vector<int> out;
      for (size_t i = 0; i < syms.size();) {
        if (i + 1 < syms.size() && syms[i] == best.first && syms[i + 1] == best.second) {
          out.push_back(id);
          i += 2;
        } else {
          out.push_back(syms[i++]);
        }
      }
      syms = std::move(out);
    }
  }
  for (auto& [a, b] : merges) {
    a = spelled(a);
    b = spelled(b);
  }
  return merges;
}

std::vector<std::pair<std::string, std::string>> saved_merges(const ByteLevelBpe& bpe) {
  TempDir dir;
  bpe.save_files(dir.path());
  std::istringstream lines(read_file(dir.file("vocab.bpe")));
  std::string line;
  std::getline(lines, line);  // "#version: 0.2"
  std::vector<std::pair<std::string, std::string>> merges;
  while (std::getline(lines, line)) {
    const size_t sp = line.find(' ');
    merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
  }
  return merges;
}

const ByteLevelBpe& trained() {
  static const ByteLevelBpe bpe = [] {
    BpeTrainer trainer;
    trainer.add_text(make_corpus());
    return trainer.train(600);
  }();
  return bpe;
}

std::vector<std::string> tricky_byte_strings() {
  std::vector<std::string> out = {
      "",
      "\xff\xfe",
      std::string("\xff\xfe" "a\0b", 5),
      std::string("nul\0byte", 8),
      "\xc3",              // truncated two-byte sequence
      "\xe2\x82",          // truncated three-byte sequence
      "\xc0\xaf",          // overlong '/'
      "\xed\xa0\x80",      // UTF-16 surrogate
      "\xf4\x90\x80\x80",  // above U+10FFFF
      "\x80\x80 cont bytes",
      "caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x98\x80 ok",
      "mixed \xff valid\xfe\xfd  \x85 nel",
      "<|endoftext|>",
      "a <|endoftext|> b",
      std::string(3000, ' ') + "x",
      std::string(2000, 'a'),
      "   \n\n\t \r\n  trailing   ",
  };
  std::mt19937 rng(99);
  for (int i = 0; i < 200; ++i) {
    std::string s(rng() % 64, '\0');
    for (char& c : s) c = static_cast<char>(rng() & 0xFF);
    out.push_back(s);
  }
  return out;
}

// =============================================================================================
// Pretokenizer

TEST(UnitPretokenizer, SplitsLikeGpt2) {
  Pretokenizer p;
  EXPECT_EQ(
      split(p, "Hello world, it's 2026! Café déjà-vu"),
      (Pieces{"Hello", " world", ",", " it", "'s", " 2026", "!", " Café", " déjà", "-", "vu"}));
}

TEST(UnitPretokenizer, WhitespaceRunsLeaveOneSpaceForTheNextWord) {
  Pretokenizer p;
  // \s+(?!\S) stops one space short of a word, so the word keeps its leading space.
  EXPECT_EQ(split(p, "!  Café"), (Pieces{"!", " ", " Café"}));
  EXPECT_EQ(split(p, "I'm 12.5 we'll  \n\nok"),
            (Pieces{"I", "'m", " 12", ".", "5", " we", "'ll", "  \n", "\n", "ok"}));
  EXPECT_EQ(split(p, "end   "), (Pieces{"end", "   "}));
}

TEST(UnitPretokenizer, InvalidUtf8BytesBecomeSingleBytePieces) {
  Pretokenizer p;
  EXPECT_EQ(split(p, std::string("ab\xff") + "cd"), (Pieces{"ab", "\xff", "cd"}));
  EXPECT_EQ(split(p, "\xed\xa0\x80"), (Pieces{"\xed", "\xa0", "\x80"}));
  EXPECT_EQ(split(p, "x\xe2\x82"), (Pieces{"x", "\xe2", "\x82"}));
  EXPECT_EQ(split(p, " caf\xc3\xa9\xc3"), (Pieces{" café", "\xc3"}));
}

TEST(UnitPretokenizer, PiecesCoverArbitraryBytes) {
  Pretokenizer p;
  for (const std::string& s : tricky_byte_strings()) {
    std::string joined;
    for (std::string_view piece : p.split(s)) {
      EXPECT_FALSE(piece.empty());
      joined += piece;
    }
    EXPECT_EQ(joined, s);
  }
}

// =============================================================================================
// Hand-written GPT-2 pair (tests/fixtures/gpt2_tiny)
//
// Design: the fixture holds only the 10 byte symbols that "the cat sat on the mat" needs
// (t h e c a s o n m Ġ, ids 0..9), 12 merges (ids 10..21) and <|endoftext|> (id 22), so the ids
// are dense 0..22 without listing all 256 bytes. Text outside that alphabet cannot be encoded
// and gives a DataError (checked below). Hand computation, ranks in brackets:
//   "the"  : t h e -> (h e)[2] -> t he -> (t he)[10] -> the                       = 20
//   " cat" : Ġ c a t -> (a t)[0] -> Ġ c at -> (Ġ c)[4] -> Ġc at -> [5] -> Ġcat      = 15
//   " sat" : likewise through (Ġ s)[6], (Ġs at)[7]                                  = 17
//   " on"  : Ġ o n -> (o n)[8] -> Ġ on -> (Ġ on)[9]                                 = 19
//   " the" : Ġ t h e -> (Ġ t)[1] -> Ġt h e -> (h e)[2] -> Ġt he -> [3] -> Ġthe      = 13
//   " mat" : Ġ m a t -> (a t)[0] before (Ġ m)[11] -> Ġm at; no (Ġm at) merge        = 21 10

TEST(UnitByteLevelBpe, TinyFixtureEncodesToHandComputedIds) {
  const ByteLevelBpe bpe =
      ByteLevelBpe::from_files(tiny_dir() + "/encoder.json", tiny_dir() + "/vocab.bpe");
  EXPECT_EQ(bpe.vocab_size(), 23);
  EXPECT_EQ(bpe.eos_id(), 22);
  EXPECT_EQ(bpe.num_merges(), 12u);
  const std::string text = "the cat sat on the mat";
  const std::vector<int32_t> ids = bpe.encode(text);
  EXPECT_EQ(ids, (std::vector<int32_t>{20, 15, 17, 19, 13, 21, 10}));
  EXPECT_EQ(bpe.decode(ids), text);
  EXPECT_EQ(bpe.token_bytes(9), " ");
  EXPECT_EQ(bpe.token_bytes(13), " the");
  EXPECT_EQ(bpe.decode({22}), "<|endoftext|>");
  EXPECT_EQ(bpe.decode({20, 22, 13}), "the<|endoftext|> the");
  EXPECT_EQ(ids, ReferenceBpe(tiny_dir()).encode(text));
}

TEST(UnitByteLevelBpe, TinyFixtureRejectsBytesOutsideItsAlphabet) {
  const ByteLevelBpe bpe =
      ByteLevelBpe::from_files(tiny_dir() + "/encoder.json", tiny_dir() + "/vocab.bpe");
  expect_data_error([&] { bpe.encode("the mat."); }, {"0x2e", "offset 7"});
}

TEST(UnitByteLevelBpe, DecodeRejectsIdsOutsideTheVocabulary) {
  const ByteLevelBpe& bpe = trained();
  expect_data_error([&] { bpe.decode({1, bpe.vocab_size()}); }, {"id"});
  expect_data_error([&] { bpe.decode({-1}); }, {"-1"});
  expect_data_error([&] { bpe.token_bytes(bpe.vocab_size()); }, {"id"});
}

TEST(UnitByteLevelBpe, ConstructorValidatesTables) {
  // In-memory tables obey the same rules as files.
  EXPECT_THROW(ByteLevelBpe({{"a", 0}, {"b", 3}, {"<|endoftext|>", 1}}, {}, "<|endoftext|>"),
               DataError);
  EXPECT_THROW(ByteLevelBpe({{"a", 0}, {"b", 1}}, {}, "<|endoftext|>"), DataError);
  EXPECT_THROW(
      ByteLevelBpe({{"a", 0}, {"b", 1}, {"<|endoftext|>", 2}}, {{"a", "b"}}, "<|endoftext|>"),
      DataError);
  const ByteLevelBpe ok({{"a", 0}, {"b", 1}, {"ab", 2}, {"<|endoftext|>", 3}}, {{"a", "b"}},
                        "<|endoftext|>");
  EXPECT_EQ(ok.encode("abab"), (std::vector<int32_t>{2, 2}));
}

// =============================================================================================
// Training

TEST(UnitBpeTrainer, LearnsHandComputedMerges) {
  // One pre-token "aaabdaaabac" (the classic example). Pair counts count overlaps, so (a a) = 4
  // wins first; then (a b) and (aa a) tie at 2 and the smaller (left, right) id, (97, 98), wins;
  // afterwards every pair occurs once and the smallest left id decides.
  BpeTrainer trainer;
  trainer.add_text("aaabdaaabac");
  EXPECT_EQ(trainer.num_unique_words(), 1u);
  const ByteLevelBpe bpe = trainer.train(300);
  const std::vector<std::string> expected = {"aa",    "ab",        "aaab",       "ac",
                                             "daaab", "aaabdaaab", "aaabdaaabac"};
  ASSERT_EQ(bpe.num_merges(), expected.size());  // stopped early: no pair left
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(bpe.token_bytes(256 + static_cast<int32_t>(i)), expected[i]) << i;
  }
  EXPECT_EQ(bpe.eos_id(), 263);
  EXPECT_EQ(bpe.vocab_size(), 264);
  EXPECT_EQ(bpe.token_bytes(263), "<|endoftext|>");
  EXPECT_EQ(bpe.encode("aaabdaaabac"), (std::vector<int32_t>{262}));
  for (int b = 0; b < 256; ++b) EXPECT_EQ(bpe.token_bytes(b), std::string(1, static_cast<char>(b)));
}

TEST(UnitBpeTrainer, VocabSizeBoundsTheMerges) {
  BpeTrainer trainer;
  trainer.add_text("aaabdaaabac");
  const ByteLevelBpe bpe = trainer.train(259);
  EXPECT_EQ(bpe.num_merges(), 2u);
  EXPECT_EQ(bpe.vocab_size(), 259);
  EXPECT_EQ(bpe.eos_id(), 258);
  EXPECT_EQ(bpe.token_bytes(257), "ab");
  EXPECT_EQ(trainer.train(257).num_merges(), 0u);
}

TEST(UnitBpeTrainer, MinFrequencyIgnoresRarePreTokens) {
  BpeTrainer trainer;
  trainer.add_text("xy xy xy zq");  // pieces: "xy" once, " xy" twice, " zq" once
  const ByteLevelBpe bpe = trainer.train(400, "<|endoftext|>", 2);
  // Only " xy" counts: (' ' x) and (x y) tie at 2, and ' ' (32) < 'x' (120).
  ASSERT_EQ(bpe.num_merges(), 2u);
  EXPECT_EQ(bpe.token_bytes(256), " x");
  EXPECT_EQ(bpe.token_bytes(257), " xy");
  EXPECT_GT(trainer.train(400).num_merges(), 2u);
}

TEST(UnitBpeTrainer, RejectsImpossibleArguments) {
  BpeTrainer trainer;
  trainer.add_text("hello");
  EXPECT_THROW(trainer.train(256), ConfigError);
  EXPECT_THROW(trainer.train(300, ""), ConfigError);
  EXPECT_THROW(trainer.train(300, "a"), ConfigError);  // a byte symbol would collide with text
}

TEST(UnitBpeTrainer, TrainedTokenizerRoundTripsArbitraryBytes) {
  const ByteLevelBpe& bpe = trained();
  EXPECT_EQ(bpe.vocab_size(), 600);
  EXPECT_EQ(bpe.eos_id(), 599);
  const std::string corpus = make_corpus();
  const std::vector<int32_t> corpus_ids = bpe.encode(corpus);
  EXPECT_LT(corpus_ids.size(), corpus.size() / 2);  // the merges do compress their own corpus
  EXPECT_EQ(bpe.decode(corpus_ids), corpus);
  for (const std::string& s : tricky_byte_strings()) {
    const std::vector<int32_t> ids = bpe.encode(s);
    EXPECT_EQ(bpe.decode(ids), s);
    for (int32_t id : ids) {
      EXPECT_NE(id, bpe.eos_id());
      EXPECT_GE(id, 0);
      EXPECT_LT(id, bpe.vocab_size());
    }
  }
  EXPECT_EQ(bpe.encode("\xff\xfe"), (std::vector<int32_t>{0xFF, 0xFE}));
  EXPECT_EQ(bpe.decode({bpe.eos_id()}), "<|endoftext|>");
}

TEST(UnitBpeTrainer, EncodeMatchesReferenceGpt2Bpe) {
  TempDir dir;
  trained().save_files(dir.path());
  const ReferenceBpe reference(dir.path());
  const ByteLevelBpe& bpe = trained();
  EXPECT_EQ(bpe.encode(make_corpus()), reference.encode(make_corpus()));
  // Long pieces exercise the heap path and left-to-right merging of overlapping pairs.
  for (const std::string& s :
       {std::string(999, 'e'), std::string(1000, 'e'), std::string(2001, ' ') + "the",
        std::string("lowerlowestnewerwidest") + std::string(300, 'w'), std::string("tttt"),
        std::string("thethethethethe thethe")}) {
    EXPECT_EQ(bpe.encode(s), reference.encode(s)) << s.substr(0, 40);
  }
  for (const std::string& s : tricky_byte_strings()) {
    EXPECT_EQ(bpe.encode(s), reference.encode(s));
  }
}

TEST(UnitBpeTrainer, MatchesNaiveTrainer) {
  BpeTrainer trainer;
  const std::string corpus = make_corpus();
  trainer.add_text(corpus);
  int skips = 0;
  EXPECT_EQ(saved_merges(trainer.train(600)), naive_train(corpus, 600, "<|endoftext|>", &skips));
  // Tiny alphabets: many merges, long symbols, stopping early.
  for (unsigned seed = 0; seed < 30; ++seed) {
    std::mt19937 rng(seed);
    std::string text;
    for (int w = 0; w < 40; ++w) {
      text += ' ';
      const int len = 1 + static_cast<int>(rng() % 9);
      for (int k = 0; k < len; ++k) text += static_cast<char>('a' + rng() % 3);
    }
    BpeTrainer t;
    t.add_text(text);
    const ByteLevelBpe bpe = t.train(330);
    EXPECT_EQ(saved_merges(bpe), naive_train(text, 330, "<|endoftext|>", &skips)) << seed;
    EXPECT_EQ(bpe.decode(bpe.encode(text)), text);
  }
}

TEST(UnitBpeTrainer, NeverLearnsTheEosSpelling) {
  // With eos "EOS" the pair (EO, S) is the best pair but must not become a symbol: text "EOS"
  // would then encode to the end-of-text id.
  const std::string text = "EOS EOS EOS EOSX EOS.";
  BpeTrainer trainer;
  trainer.add_text(text);
  const ByteLevelBpe bpe = trainer.train(300, "EOS");
  int skips = 0;
  EXPECT_EQ(saved_merges(bpe), naive_train(text, 300, "EOS", &skips));
  EXPECT_GT(skips, 0);
  for (int32_t id = 0; id < bpe.vocab_size(); ++id) {
    if (id != bpe.eos_id()) {
      EXPECT_NE(bpe.token_bytes(id), "EOS");
    }
  }
  for (const std::string& s : {std::string("EOS"), text}) {
    const std::vector<int32_t> ids = bpe.encode(s);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), bpe.eos_id()), 0);
    EXPECT_EQ(bpe.decode(ids), s);
  }
}

TEST(UnitBpeTrainer, TrainingIsDeterministic) {
  const std::string corpus = make_corpus();
  const std::string first_half = corpus.substr(0, corpus.size() / 2);
  const std::string second_half = corpus.substr(corpus.size() / 2);
  BpeTrainer a, b, c;
  a.add_text(corpus);
  b.add_text(corpus);
  // Counts are per piece, so the order of add_text calls cannot matter.
  c.add_text(second_half);
  c.add_text(first_half);
  BpeTrainer d;
  d.add_text(first_half);
  d.add_text(second_half);
  const std::string fp = a.train(500).fingerprint();
  EXPECT_EQ(fp.size(), 16u);
  EXPECT_EQ(fp.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ(b.train(500).fingerprint(), fp);
  EXPECT_EQ(c.train(500).fingerprint(), d.train(500).fingerprint());
  EXPECT_NE(a.train(501).fingerprint(), fp);
  EXPECT_NE(a.train(500, "<eos>").fingerprint(), fp);
}

TEST(UnitBpeTrainer, ByteSymbolsUseGpt2Alphabet) {
  TempDir dir;
  trained().save_files(dir.path());
  EXPECT_EQ(read_file(dir.file("vocab.bpe")).rfind("#version: 0.2\n", 0), 0u);
  const auto doc = nlohmann::json::parse(read_file(dir.file("encoder.json")));
  std::map<int, std::string> by_id;
  for (auto it = doc.begin(); it != doc.end(); ++it) by_id[it.value().get<int>()] = it.key();
  EXPECT_EQ(by_id[0], "\xc4\x80");     // U+0100
  EXPECT_EQ(by_id[' '], "\xc4\xa0");   // U+0120 'Ġ'
  EXPECT_EQ(by_id[0x7F], "\xc4\xa1");  // U+0121
  EXPECT_EQ(by_id[0xA0], "\xc5\x82");  // U+0142
  EXPECT_EQ(by_id[0xAD], "\xc5\x83");  // U+0143
  EXPECT_EQ(by_id['A'], "A");
  EXPECT_EQ(by_id[0xA1], "\xc2\xa1");  // '¡' stands for itself
  EXPECT_EQ(by_id[599], "<|endoftext|>");
  const std::vector<std::string> reference = reference_byte_symbols();
  for (int b = 0; b < 256; ++b) EXPECT_EQ(by_id[b], reference[b]) << b;
}

TEST(UnitBpeTrainer, SaveFilesFromFilesRoundTrip) {
  TempDir dir;
  const ByteLevelBpe& bpe = trained();
  bpe.save_files(dir.path());
  const ByteLevelBpe loaded =
      ByteLevelBpe::from_files(dir.file("encoder.json"), dir.file("vocab.bpe"));
  EXPECT_EQ(loaded.fingerprint(), bpe.fingerprint());
  EXPECT_EQ(loaded.vocab_size(), bpe.vocab_size());
  EXPECT_EQ(loaded.num_merges(), bpe.num_merges());
  EXPECT_EQ(loaded.eos_id(), bpe.eos_id());
  const std::string corpus = make_corpus();
  EXPECT_EQ(loaded.encode(corpus), bpe.encode(corpus));
  for (int32_t id = 0; id < bpe.vocab_size(); ++id) {
    EXPECT_EQ(loaded.token_bytes(id), bpe.token_bytes(id));
  }
  // No temporary files are left behind.
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(dir.path())) {
    (void)entry;
    ++files;
  }
  EXPECT_EQ(files, 2u);
}

// =============================================================================================
// Malformed files

class UnitTokenizerFiles : public ::testing::Test {
 protected:
  // Valid tiny pair: bytes a, b, merge (a b), eos.
  static constexpr const char* kEncoder = R"({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3})";
  static constexpr const char* kMerges = "#version: 0.2\na b\n";

  void SetUp() override {
    encoder_ = dir_.file("enc_x.json");
    merges_ = dir_.file("merges_x.bpe");
  }
  void load(const std::string& encoder, const std::string& merges,
            const std::string& eos = "<|endoftext|>") {
    write_file(encoder_, encoder);
    write_file(merges_, merges);
    ByteLevelBpe::from_files(encoder_, merges_, eos);
  }
  void expect_encoder_error(const std::string& encoder, std::vector<std::string> needles) {
    SCOPED_TRACE(encoder);
    needles.push_back("enc_x.json");
    expect_data_error([&] { load(encoder, kMerges); }, needles);
  }
  void expect_merges_error(const std::string& merges, int line, std::vector<std::string> needles) {
    SCOPED_TRACE(merges);
    needles.push_back("merges_x.bpe");
    needles.push_back("line " + std::to_string(line));
    expect_data_error([&] { load(kEncoder, merges); }, needles);
  }

  TempDir dir_;
  std::string encoder_, merges_;
};

TEST_F(UnitTokenizerFiles, ValidPairLoads) {
  write_file(encoder_, kEncoder);
  write_file(merges_, kMerges);
  const ByteLevelBpe bpe = ByteLevelBpe::from_files(encoder_, merges_);
  EXPECT_EQ(bpe.encode("abab"), (std::vector<int32_t>{2, 2}));
  // The "#version" line is optional, and trailing empty lines and CRLF endings are accepted.
  write_file(merges_, "a b\r\n\n\n");
  EXPECT_EQ(ByteLevelBpe::from_files(encoder_, merges_).num_merges(), 1u);
}

TEST_F(UnitTokenizerFiles, MissingFiles) {
  write_file(merges_, kMerges);
  expect_data_error([&] { ByteLevelBpe::from_files(dir_.file("nope.json"), merges_); },
                    {"nope.json", "not found"});
  write_file(encoder_, kEncoder);
  expect_data_error([&] { ByteLevelBpe::from_files(encoder_, dir_.file("nope.bpe")); },
                    {"nope.bpe", "not found"});
  expect_data_error([&] { ByteLevelBpe::from_files(dir_.path(), merges_); }, {"directory"});
}

TEST_F(UnitTokenizerFiles, MalformedEncoder) {
  expect_encoder_error(R"({"a": 0, "b": 1,)", {"invalid JSON", "byte"});
  expect_encoder_error("", {"invalid JSON"});
  expect_encoder_error("\xff", {"invalid JSON"});
  expect_encoder_error(R"(["a", "b"])", {"expected a JSON object", "array"});
  expect_encoder_error(R"({"a": 0, "b": "1", "ab": 2, "<|endoftext|>": 3})",
                       {"\"b\"", "non-negative integer"});
  expect_encoder_error(R"({"a": 0, "b": 1.5, "ab": 2, "<|endoftext|>": 3})", {"\"b\"", "1.5"});
  expect_encoder_error(R"({"a": 0, "b": -1, "ab": 2, "<|endoftext|>": 3})", {"\"b\"", "-1"});
  expect_encoder_error(R"({"a": 0, "b": null, "ab": 2, "<|endoftext|>": 3})", {"\"b\""});
  expect_encoder_error(R"({"a": 0, "b": 99999999999, "ab": 2, "<|endoftext|>": 3})", {"\"b\""});
  expect_encoder_error(R"({"a": 0, "b": 0, "ab": 2, "<|endoftext|>": 3})",
                       {"id 0", "\"a\"", "\"b\""});
  expect_encoder_error(R"({"a": 0, "b": 1, "ab": 5, "<|endoftext|>": 3})", {"dense", "id 2"});
  expect_encoder_error(R"({"a": 0, "b": 1, "a": 2, "<|endoftext|>": 3})",
                       {"duplicate key", "\"a\""});
  expect_encoder_error(R"({"a": 0, "b": 1, "ab": 2, "<eos>": 3})", {"<|endoftext|>", "not in"});
  expect_encoder_error("{}", {"empty"});
}

TEST_F(UnitTokenizerFiles, MalformedMerges) {
  expect_merges_error("#version: 0.2\nab\n", 2, {"two symbols", "\"ab\""});
  expect_merges_error("#version: 0.2\na b b\n", 2, {"two symbols"});
  expect_merges_error("#version: 0.2\na  b\n", 2, {"two symbols"});
  expect_merges_error("#version: 0.2\na\tb\n", 2, {"two symbols"});
  expect_merges_error("#version: 0.2\n\na b\n", 2, {"two symbols"});  // empty line inside
  expect_merges_error("a b\n b\n", 2, {"two symbols"});
  expect_merges_error("#version: 0.2\na b\na c\n", 3, {"\"c\"", "enc_x.json"});
  expect_merges_error("#version: 0.2\na b\nb a\n", 3, {"\"ba\"", "merge result"});
  expect_merges_error("#version: 0.2\na b\na b\n", 3, {"duplicate", "line 2"});
  // Only the first line may be a header; later '#' lines are merges like any other.
  expect_merges_error("#version: 0.2\na b\n# comment\n", 3, {"\"#\"", "not in"});
}

TEST_F(UnitTokenizerFiles, MergeMustNotProduceEos) {
  expect_data_error([&] { load(R"({"a": 0, "b": 1, "ab": 2})", "a b\n", "ab"); },
                    {"merges_x.bpe", "line 1", "end-of-text"});
}

// =============================================================================================
// Tokenizer folders

TEST(UnitTokenizer, SaveLoadRoundTrip) {
  TempDir dir;
  const std::string folder = dir.file("nested/tok");
  Tokenizer tok("byte_bpe",
                ByteLevelBpe::from_files(tiny_dir() + "/encoder.json", tiny_dir() + "/vocab.bpe"));
  tok.save(folder);
  const auto config = nlohmann::json::parse(read_file(folder + "/tokenizer.json"));
  EXPECT_EQ(config.at("kind"), "byte_bpe");
  EXPECT_EQ(config.at("format_version"), 1);
  EXPECT_EQ(config.at("encoder"), "encoder.json");
  EXPECT_EQ(config.at("merges"), "vocab.bpe");
  EXPECT_EQ(config.at("eos"), "<|endoftext|>");
  const Tokenizer loaded = Tokenizer::load(folder);
  EXPECT_EQ(loaded.kind(), "byte_bpe");
  EXPECT_EQ(loaded.fingerprint(), tok.fingerprint());
  EXPECT_EQ(loaded.vocab_size(), 23);
  EXPECT_EQ(loaded.eos_id(), 22);
  EXPECT_EQ(loaded.encode("the cat sat on the mat"), tok.encode("the cat sat on the mat"));
  EXPECT_EQ(loaded.decode({20, 22}), "the<|endoftext|>");
}

TEST(UnitTokenizer, TrainedSaveLoadRoundTrip) {
  TempDir dir;
  BpeTrainer trainer;
  trainer.add_text(make_corpus());
  const Tokenizer tok("gpt2", trainer.train(400, "<eos>"));
  tok.save(dir.path());
  tok.save(dir.path());  // overwriting an existing folder is fine
  const Tokenizer loaded = Tokenizer::load(dir.path());
  EXPECT_EQ(loaded.kind(), "gpt2");
  EXPECT_EQ(loaded.fingerprint(), tok.fingerprint());
  EXPECT_EQ(loaded.decode({loaded.eos_id()}), "<eos>");
  EXPECT_EQ(loaded.encode(make_corpus()), tok.encode(make_corpus()));
}

TEST(UnitTokenizer, UnknownKindInCodeIsAConfigError) {
  EXPECT_THROW(Tokenizer("sentencepiece", ByteLevelBpe::from_files(tiny_dir() + "/encoder.json",
                                                                   tiny_dir() + "/vocab.bpe")),
               ConfigError);
}

TEST(UnitTokenizer, LoadRejectsMalformedConfig) {
  TempDir dir;
  const std::string cfg = dir.file("tokenizer.json");
  fs::copy_file(tiny_dir() + "/encoder.json", dir.file("encoder.json"));
  fs::copy_file(tiny_dir() + "/vocab.bpe", dir.file("vocab.bpe"));
  auto expect_bad = [&](const std::string& text, std::vector<std::string> needles) {
    SCOPED_TRACE(text);
    write_file(cfg, text);
    needles.push_back("tokenizer.json");
    expect_data_error([&] { Tokenizer::load(dir.path()); }, needles);
  };
  const nlohmann::json good = {{"kind", "gpt2"},
                               {"format_version", 1},
                               {"encoder", "encoder.json"},
                               {"merges", "vocab.bpe"},
                               {"eos", "<|endoftext|>"}};
  write_file(cfg, good.dump());
  EXPECT_EQ(Tokenizer::load(dir.path()).vocab_size(), 23);

  expect_bad("{\"kind\": ", {"invalid JSON"});
  expect_bad("[1]", {"object"});
  for (const char* key : {"kind", "format_version", "encoder", "merges", "eos"}) {
    nlohmann::json j = good;
    j.erase(key);
    expect_bad(j.dump(), {"missing key", key});
  }
  auto with = [&](const char* key, nlohmann::json value) {
    nlohmann::json j = good;
    j[key] = std::move(value);
    return j.dump();
  };
  expect_bad(with("kind", "wordpiece"), {"\"kind\"", "wordpiece"});
  expect_bad(with("kind", 3), {"\"kind\""});
  expect_bad(with("format_version", 2), {"\"format_version\"", "2"});
  expect_bad(with("format_version", "1"), {"\"format_version\""});
  expect_bad(with("encoder", nullptr), {"\"encoder\""});
  expect_bad(with("merges", ""), {"\"merges\""});
  expect_bad(with("extra", 1), {"unknown key", "extra"});

  // Errors in the files it names carry their own file name.
  write_file(cfg, with("merges", "missing.bpe"));
  expect_data_error([&] { Tokenizer::load(dir.path()); }, {"missing.bpe"});
  write_file(cfg, with("eos", "<eos>"));
  expect_data_error([&] { Tokenizer::load(dir.path()); }, {"encoder.json", "<eos>"});
  expect_data_error([&] { Tokenizer::load(dir.file("absent")); }, {"tokenizer.json"});
}

TEST(UnitTokenizer, LoadResolvesAbsolutePaths) {
  TempDir dir;
  const nlohmann::json cfg = {{"kind", "gpt2"},
                              {"format_version", 1},
                              {"encoder", fs::absolute(tiny_dir() + "/encoder.json").string()},
                              {"merges", fs::absolute(tiny_dir() + "/vocab.bpe").string()},
                              {"eos", "<|endoftext|>"}};
  write_file(dir.file("tokenizer.json"), cfg.dump());
  EXPECT_EQ(Tokenizer::load(dir.path()).encode("the cat"), (std::vector<int32_t>{20, 15}));
}

}  // namespace
}  // namespace mixdiff

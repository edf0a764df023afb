// GPT-2 byte-level BPE training: counts pre-tokens, then learns ranked merges over byte symbols,
// breaking ties in pair counts by the smaller (left id, right id) pair so that training is
// deterministic. See data/tokenizer.h for the contract; the encoder is in data/tokenizer.cpp.
#include "data/tokenizer.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "data/tokenizer_internal.h"

namespace mixdiff {
namespace {

using tokenizer_detail::byte_alphabet;
using tokenizer_detail::ByteAlphabet;
using tokenizer_detail::is_valid_utf8;
using tokenizer_detail::pair_key;
using tokenizer_detail::PairHash;
using tokenizer_detail::quote;

// Raw bytes -> the byte-alphabet form that encoder.json and vocab.bpe store.
std::string bytes_to_symbols(std::string_view bytes) {
  const ByteAlphabet& a = byte_alphabet();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) out += a.symbol[c];
  return out;
}

}  // namespace

// =============================================================================================
// BpeTrainer

struct BpeTrainer::Impl {
  Pretokenizer pretokenizer;
  std::unordered_map<std::string, int64_t> counts;
};

BpeTrainer::BpeTrainer() : impl_(std::make_unique<Impl>()) {}
BpeTrainer::~BpeTrainer() = default;

void BpeTrainer::add_text(std::string_view text) {
  for (std::string_view piece : impl_->pretokenizer.split(text)) {
    ++impl_->counts[std::string(piece)];
  }
}

size_t BpeTrainer::num_unique_words() const { return impl_->counts.size(); }

namespace {
struct PairCount {
  int64_t count;
  uint64_t key;  // (left << 32) | right, so key order is (left, right) order
};

// Max-heap order: highest count first, ties to the smaller (left id, right id).
struct PairCountBefore {
  bool operator()(const PairCount& a, const PairCount& b) const {
    return a.count != b.count ? a.count < b.count : a.key > b.key;
  }
};

struct Word {
  std::vector<int32_t> symbols;
  int64_t count;
};
}  // namespace

// Standard incremental BPE training: pair counts plus an index pair -> words that contain it, so
// that each merge only touches the words where the pair occurs. The heap holds possibly stale
// counts; an entry is trusted only when it matches the live count (counts of existing pairs only
// fall, and every rise is pushed anew, so the first matching entry is the true maximum).
ByteLevelBpe BpeTrainer::train(int32_t vocab_size, const std::string& eos_token,
                               int64_t min_frequency) const {
  if (vocab_size < 257) {
    throw ConfigError(
        str("tokenizer vocab_size must be at least 257 (256 bytes + end-of-text), got ",
            vocab_size));
  }
  if (eos_token.empty() || !is_valid_utf8(eos_token)) {
    throw ConfigError(
        str("end-of-text token ", quote(eos_token), " must be a non-empty UTF-8 string"));
  }
  const ByteAlphabet& alphabet = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    if (alphabet.symbol[b] == eos_token) {
      throw ConfigError(str("end-of-text token ", quote(eos_token),
                            " is a single-byte symbol, expected a token text cannot produce"));
    }
  }
  const size_t max_symbols = static_cast<size_t>(vocab_size) - 1;  // all but the eos slot

  // Sorted words make memory layout (and any debugging output) independent of hash order; the
  // merges themselves depend only on counts and the tie-break.
  std::vector<const std::pair<const std::string, int64_t>*> kept;
  kept.reserve(impl_->counts.size());
  for (const auto& entry : impl_->counts) {
    if (entry.second >= min_frequency && entry.first.size() >= 2) kept.push_back(&entry);
  }
  std::sort(kept.begin(), kept.end(),
            [](const auto* a, const auto* b) { return a->first < b->first; });

  std::vector<Word> words(kept.size());
  std::unordered_map<uint64_t, int64_t, PairHash> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>, PairHash> where;
  for (size_t w = 0; w < kept.size(); ++w) {
    const std::string& text = kept[w]->first;
    words[w].count = kept[w]->second;
    words[w].symbols.assign(text.begin(), text.end());
    for (int32_t& s : words[w].symbols) s = static_cast<unsigned char>(s);
    const auto& syms = words[w].symbols;
    for (size_t i = 0; i + 1 < syms.size(); ++i) {
      const uint64_t key = pair_key(syms[i], syms[i + 1]);
      pair_count[key] += words[w].count;
      auto& list = where[key];
      if (list.empty() || list.back() != static_cast<int32_t>(w)) list.push_back(w);
    }
  }
  PairCountBefore before;
  std::vector<PairCount> heap;
  heap.reserve(pair_count.size());
  for (const auto& [key, count] : pair_count) heap.push_back(PairCount{count, key});
  std::make_heap(heap.begin(), heap.end(), before);

  std::vector<std::string> symbol_bytes(256);
  for (int b = 0; b < 256; ++b) symbol_bytes[b] = std::string(1, static_cast<char>(b));
  std::unordered_set<std::string> existing(symbol_bytes.begin(), symbol_bytes.end());
  std::vector<std::pair<int32_t, int32_t>> merges;
  std::unordered_set<uint64_t, PairHash> skipped;
  std::vector<uint64_t> grown;  // pairs whose count rose during the current merge

  auto add = [&](uint64_t key, int64_t delta) {
    auto it = pair_count.find(key);
    if (it == pair_count.end()) {
      pair_count.emplace(key, delta);
    } else if ((it->second += delta) == 0) {
      pair_count.erase(it);
    }
  };
  auto add_new = [&](uint64_t key, int64_t delta, int32_t w) {
    add(key, delta);
    grown.push_back(key);
    auto& list = where[key];
    if (list.empty() || list.back() != w) list.push_back(w);
  };

  while (symbol_bytes.size() < max_symbols && !heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), before);
    const PairCount top = heap.back();
    heap.pop_back();
    auto live = pair_count.find(top.key);
    const int64_t count = live == pair_count.end() ? 0 : live->second;
    if (count <= 0) continue;
    if (count != top.count) {
      heap.push_back(PairCount{count, top.key});
      std::push_heap(heap.begin(), heap.end(), before);
      continue;
    }
    if (skipped.count(top.key)) continue;
    const int32_t left = static_cast<int32_t>(top.key >> 32);
    const int32_t right = static_cast<int32_t>(top.key & 0xFFFFFFFFu);
    std::string merged = symbol_bytes[left] + symbol_bytes[right];
    // A pair that spells the end-of-text token is never merged: encode() could then produce the
    // eos id from text. A pair that spells an existing symbol ("ab"+"c" after "a"+"bc") cannot
    // arise with this leftmost, globally ordered merging (a stretch whose ends survive to step t
    // is segmented as it would be alone, hence as when the symbol was made), but the GPT-2
    // format has one id per string and a reused id would break encode() parity, so it is
    // skipped the same way rather than trusted.
    if (existing.count(merged) || bytes_to_symbols(merged) == eos_token) {
      skipped.insert(top.key);
      continue;
    }
    const int32_t id = static_cast<int32_t>(symbol_bytes.size());
    existing.insert(merged);
    symbol_bytes.push_back(std::move(merged));
    merges.emplace_back(left, right);

    std::vector<int32_t> affected;
    auto where_it = where.find(top.key);
    if (where_it != where.end()) {
      affected = std::move(where_it->second);
      where.erase(where_it);
    }
    grown.clear();
    for (int32_t w : affected) {
      std::vector<int32_t>& s = words[w].symbols;
      const int64_t c = words[w].count;
      const size_t n = s.size();
      size_t out = 0;
      // In place, left to right: s[0..out) is already rewritten, s[i..n) is not. Neighbour
      // updates therefore see the merged symbol on the left and the original on the right, which
      // makes back-to-back occurrences ("A B A B") account correctly.
      for (size_t i = 0; i < n;) {
        if (i + 1 < n && s[i] == left && s[i + 1] == right) {
          if (out > 0) {
            add(pair_key(s[out - 1], left), -c);
            add_new(pair_key(s[out - 1], id), c, w);
          }
          if (i + 2 < n) {
            add(pair_key(right, s[i + 2]), -c);
            add_new(pair_key(id, s[i + 2]), c, w);
          }
          s[out++] = id;
          i += 2;
        } else {
          s[out++] = s[i++];
        }
      }
      s.resize(out);
    }
    pair_count.erase(top.key);
    std::sort(grown.begin(), grown.end());
    grown.erase(std::unique(grown.begin(), grown.end()), grown.end());
    for (uint64_t key : grown) {
      auto it = pair_count.find(key);
      if (it != pair_count.end() && it->second > 0) {
        heap.push_back(PairCount{it->second, key});
        std::push_heap(heap.begin(), heap.end(), before);
      }
    }
  }

  std::unordered_map<std::string, int32_t> encoder;
  encoder.reserve(symbol_bytes.size() + 1);
  std::vector<std::string> tokens(symbol_bytes.size());
  for (size_t id = 0; id < symbol_bytes.size(); ++id) {
    tokens[id] = bytes_to_symbols(symbol_bytes[id]);
    encoder.emplace(tokens[id], static_cast<int32_t>(id));
  }
  encoder.emplace(eos_token, static_cast<int32_t>(symbol_bytes.size()));
  std::vector<std::pair<std::string, std::string>> merge_strings;
  merge_strings.reserve(merges.size());
  for (const auto& [l, r] : merges) merge_strings.emplace_back(tokens[l], tokens[r]);
  return ByteLevelBpe(std::move(encoder), std::move(merge_strings), eos_token);
}

}  // namespace mixdiff

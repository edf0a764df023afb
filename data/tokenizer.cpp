// Byte-level BPE with GPT-2 semantics: pre-tokeniser (PCRE2), encoder/decoder, GPT-2 file I/O
// and tokenizer folders; the trainer is in data/bpe_trainer.cpp. See data/tokenizer.h for the
// contract.
#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <unordered_set>

#include "core/errors.h"
#include "core/fs.h"
#include "data/tokenizer_internal.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

using tokenizer_detail::byte_alphabet;
using tokenizer_detail::ByteAlphabet;
using tokenizer_detail::is_valid_utf8;
using tokenizer_detail::pair_key;
using tokenizer_detail::PairHash;
using tokenizer_detail::printable;
using tokenizer_detail::quote;
using tokenizer_detail::utf8_sequence_length;

constexpr const char* kPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Pieces longer than this are encoded but not cached: they are rare (long runs of one class of
// characters), and caching them would let one odd document fill the cache with megabytes.
constexpr size_t kMaxCachedPieceBytes = 256;
// The cache is dropped wholesale at this size; English needs far fewer distinct pieces, so this
// only bounds memory on adversarial or very diverse input.
constexpr size_t kMaxCacheEntries = size_t{1} << 20;

// Inverse of bytes_to_symbols (data/bpe_trainer.cpp); false when `symbols` has a code point
// outside the alphabet (special tokens such as "<pad>" happen to be inside it, arbitrary strings
// need not be).
bool symbols_to_bytes(std::string_view symbols, std::string* out) {
  const ByteAlphabet& a = byte_alphabet();
  out->clear();
  const auto* p = reinterpret_cast<const unsigned char*>(symbols.data());
  for (size_t i = 0; i < symbols.size();) {
    const size_t len = utf8_sequence_length(p + i, symbols.size() - i);
    uint32_t cp;
    if (len == 1) {
      cp = p[i];
    } else if (len == 2) {
      cp = ((p[i] & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu);
    } else {
      return false;  // invalid, or three/four-byte forms, which are all above U+0143
    }
    if (cp >= a.byte_of.size() || a.byte_of[cp] < 0) return false;
    out->push_back(static_cast<char>(a.byte_of[cp]));
    i += len;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Small pieces

void create_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw DataError(str(dir, ": cannot create directory: ", ec.message()));
}

// nlohmann's message starts with "[json.exception.parse_error.101] "; the tag means nothing to a
// user, the line/column that follows does.
std::string json_error_text(const json::exception& e) {
  std::string what = e.what();
  if (!what.empty() && what[0] == '[') {
    const size_t close = what.find("] ");
    if (close != std::string::npos) what = what.substr(close + 2);
  }
  return printable(what, 300, false);
}

std::string json_type_and_value(const json& v) {
  std::string dumped = v.dump(-1, ' ', true);
  if (dumped.size() > 40) dumped = dumped.substr(0, 40) + "...";
  return str(v.type_name(), " ", dumped);
}

// FNV-1a 64 (offset basis 14695981039346656037, prime 1099511628211) over this byte stream, all
// integers u64 little-endian: token count, then each token string in id order as (length, bytes);
// merge count, then each merge as (length, bytes) of its left and right symbol; then the eos
// string as (length, bytes). Length prefixes keep ("ab","c") and ("a","bc") apart.
struct Fnv1a64 {
  uint64_t h = 14695981039346656037ULL;
  void byte(unsigned char c) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) byte(static_cast<unsigned char>(v >> (8 * i)));
  }
  void text(std::string_view s) {
    u64(s.size());
    for (unsigned char c : s) byte(c);
  }
};

// Where the tables came from, so that errors name a file and line when there is one.
struct Origin {
  std::string encoder;             // "path/encoder.json" or a description of an in-memory table
  std::string merges;              // likewise for vocab.bpe
  std::vector<size_t> merge_line;  // 1-based line of each merge; empty for in-memory tables

  std::string merge_where(size_t index) const {
    if (merge_line.empty()) return str(merges, ": merge ", index);
    return str(merges, ": line ", merge_line[index]);
  }
};

}  // namespace

// =============================================================================================
// Pretokenizer

struct Pretokenizer::Impl {
  pcre2_code* code = nullptr;
  pcre2_match_data* match = nullptr;
  bool jit = false;

  ~Impl() {
    if (match) pcre2_match_data_free(match);
    if (code) pcre2_code_free(code);
  }

  // `run` is valid UTF-8 (checked by the caller), which is what makes PCRE2_NO_UTF_CHECK safe and
  // saves PCRE2 from re-validating the rest of the subject on every call.
  void split_valid(std::string_view run, std::vector<std::string_view>& pieces) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(run.data());
    const size_t len = run.size();
    size_t off = 0;
    while (off < len) {
      const int rc = jit ? pcre2_jit_match(code, subject, len, off, 0, match, nullptr)
                         : pcre2_match(code, subject, len, off, PCRE2_NO_UTF_CHECK, match, nullptr);
      size_t start = off, end = off;
      if (rc > 0) {
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match);
        start = ov[0];
        end = ov[1];
      }
      // Every code point is matched by one of the alternatives, so the fallbacks below only keep
      // the "pieces cover the text" contract if PCRE2 ever reports an error (e.g. a resource
      // limit) or a gap.
      if (rc <= 0 || start < off || end <= start) {
        const size_t cl = utf8_sequence_length(subject + off, len - off);
        pieces.push_back(run.substr(off, cl));
        off += cl;
        continue;
      }
      if (start > off) pieces.push_back(run.substr(off, start - off));
      pieces.push_back(run.substr(start, end - start));
      off = end;
    }
  }
};

Pretokenizer::Pretokenizer(const std::string& pattern) : impl_(std::make_unique<Impl>()) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  const std::string& p = pattern.empty() ? std::string(kPattern) : pattern;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.c_str()), PCRE2_ZERO_TERMINATED,
                              PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
  if (!impl_->code) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof message);
    throw DataError(str("pre-tokenizer pattern ", quote(p), ": PCRE2 rejects it at offset ",
                        error_offset, ": ", reinterpret_cast<const char*>(message)));
  }
  // JIT is an optimisation only: some builds or platforms lack it, and the interpreter gives the
  // same matches.
  impl_->jit = pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0;
  impl_->match = pcre2_match_data_create_from_pattern(impl_->code, nullptr);
  if (!impl_->match) throw std::bad_alloc();
}

Pretokenizer::~Pretokenizer() = default;
Pretokenizer::Pretokenizer(Pretokenizer&&) noexcept = default;
Pretokenizer& Pretokenizer::operator=(Pretokenizer&&) noexcept = default;

std::vector<std::string_view> Pretokenizer::split(std::string_view text) const {
  std::vector<std::string_view> pieces;
  pieces.reserve(text.size() / 4 + 1);
  const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t pos = 0;
  while (pos < n) {
    size_t end = pos;
    while (end < n) {
      if (bytes[end] < 0x80) {
        ++end;
        continue;
      }
      const size_t len = utf8_sequence_length(bytes + end, n - end);
      if (len == 0) break;
      end += len;
    }
    if (end > pos) {
      impl_->split_valid(text.substr(pos, end - pos), pieces);
      pos = end;
    }
    // A byte that starts no valid sequence becomes a piece of its own: PCRE2 must not see it,
    // and as a one-byte piece it still maps to a byte symbol, so the text round-trips.
    if (pos < n) {
      pieces.push_back(text.substr(pos, 1));
      ++pos;
    }
  }
  return pieces;
}

// =============================================================================================
// ByteLevelBpe

namespace {
struct MergeInfo {
  int32_t rank;
  int32_t result;
};

// A candidate merge inside one word: symbol nodes `pos` and its successor, which held `left` and
// `right` when the entry was made. Entries go stale when either node changes; they are checked
// when popped instead of being removed.
struct Candidate {
  int32_t rank;
  int32_t pos;
  int32_t left;
  int32_t right;
  int32_t result;
};

// Min-heap order: lowest rank first, then leftmost, which is the order GPT-2's bpe() merges in.
struct CandidateAfter {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  }
};

struct Node {
  int32_t id;  // -1 once absorbed into its left neighbour
  int32_t prev;
  int32_t next;
};
}  // namespace

struct ByteLevelBpe::Impl {
  std::vector<std::string> tokens;  // id -> token string in byte-alphabet form
  std::vector<std::string> bytes;   // id -> raw bytes that decode() emits
  std::unordered_map<std::string, int32_t> encoder;
  std::vector<std::pair<std::string, std::string>> merges;
  std::unordered_map<uint64_t, MergeInfo, PairHash> merge_table;
  std::array<int32_t, 256> byte_id{};  // -1 where the encoder lacks that byte's symbol
  std::string eos;
  int32_t eos_id = -1;
  std::string fingerprint;
  std::string base_fingerprint;  // of (encoder, merges, eos); `fingerprint` adds the pre-tokenizer

  Pretokenizer pretokenizer;
  std::string pattern;         // empty: GPT-2's
  bool ignore_merges = false;  // a piece that is a token is that token (Llama-3's tokenizer.json)
  // encode() is const but memoises per piece and reuses scratch buffers. The mutex makes
  // concurrent calls on one shared tokenizer safe (they run one at a time); an uncontended lock
  // costs nothing next to an encode, and threads that need parallel encoding load their own copy.
  mutable std::mutex mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;
  mutable std::vector<Node> nodes;
  mutable std::vector<Candidate> heap;
  mutable std::vector<Candidate> deferred;

  static std::unique_ptr<Impl> build(std::unordered_map<std::string, int32_t> encoder,
                                     std::vector<std::pair<std::string, std::string>> merges,
                                     std::string eos, const Origin& origin);

  const MergeInfo* find_merge(int32_t left, int32_t right) const {
    auto it = merge_table.find(pair_key(left, right));
    return it == merge_table.end() ? nullptr : &it->second;
  }

  void bpe(std::string_view piece, size_t offset, std::vector<int32_t>& out) const;
};

std::unique_ptr<ByteLevelBpe::Impl> ByteLevelBpe::Impl::build(
    std::unordered_map<std::string, int32_t> encoder,
    std::vector<std::pair<std::string, std::string>> merges, std::string eos,
    const Origin& origin) {
  auto impl = std::make_unique<Impl>();
  const std::string& enc = origin.encoder;
  if (encoder.empty()) throw DataError(str(enc, ": the encoder is empty, expected token ids"));

  // Ids must be exactly 0..N-1: the model's embedding table and the mask id (= vocab_size())
  // are sized from this. Sorting gives deterministic messages for duplicates and gaps.
  std::vector<std::pair<int32_t, const std::string*>> by_id;
  by_id.reserve(encoder.size());
  for (const auto& [token, id] : encoder) {
    if (token.empty()) throw DataError(str(enc, ": empty token (id ", id, "), expected a string"));
    if (!is_valid_utf8(token)) {
      throw DataError(str(enc, ": token ", quote(token), " is not valid UTF-8"));
    }
    if (id < 0) throw DataError(str(enc, ": token ", quote(token), " has negative id ", id));
    by_id.emplace_back(id, &token);
  }
  std::sort(by_id.begin(), by_id.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first : *a.second < *b.second;
  });
  for (size_t i = 0; i < by_id.size(); ++i) {
    if (i > 0 && by_id[i].first == by_id[i - 1].first) {
      throw DataError(str(enc, ": id ", by_id[i].first, " is used by both ",
                          quote(*by_id[i - 1].second), " and ", quote(*by_id[i].second),
                          ", expected unique ids"));
    }
    if (by_id[i].first != static_cast<int32_t>(i)) {
      throw DataError(str(enc, ": ids must be dense 0..", by_id.size() - 1, " but id ", i,
                          " is missing (next id is ", by_id[i].first, ")"));
    }
  }
  const size_t n = by_id.size();
  impl->tokens.resize(n);
  impl->bytes.resize(n);
  for (size_t i = 0; i < n; ++i) {
    impl->tokens[i] = *by_id[i].second;
    // Tokens outside the byte alphabet (added special tokens) decode to their own UTF-8.
    if (!symbols_to_bytes(impl->tokens[i], &impl->bytes[i])) impl->bytes[i] = impl->tokens[i];
  }

  const ByteAlphabet& alphabet = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    auto it = encoder.find(alphabet.symbol[b]);
    impl->byte_id[b] = it == encoder.end() ? -1 : it->second;
  }

  auto eos_it = encoder.find(eos);
  if (eos_it == encoder.end()) {
    throw DataError(str(enc, ": end-of-text token ", quote(eos), " is not in the encoder"));
  }
  // encode() must never produce the end-of-text id from text; a single-byte eos would.
  for (int b = 0; b < 256; ++b) {
    if (alphabet.symbol[b] == eos) {
      throw DataError(str(enc, ": end-of-text token ", quote(eos),
                          " is a single-byte symbol, expected a token text cannot produce"));
    }
  }
  impl->eos_id = eos_it->second;
  impl->bytes[impl->eos_id] = eos;  // special tokens decode verbatim

  impl->merge_table.reserve(merges.size() * 2);
  std::unordered_map<uint64_t, size_t, PairHash> first_index;
  for (size_t k = 0; k < merges.size(); ++k) {
    const auto& [a, b] = merges[k];
    for (const std::string* part : {&a, &b}) {
      if (part->empty() || part->find_first_of(" \t\r\n") != std::string::npos) {
        throw DataError(str(origin.merge_where(k), ": merge part ", quote(*part),
                            " must be a non-empty symbol without whitespace"));
      }
    }
    auto ia = encoder.find(a);
    if (ia == encoder.end()) {
      throw DataError(str(origin.merge_where(k), ": symbol ", quote(a), " is not in ", enc));
    }
    auto ib = encoder.find(b);
    if (ib == encoder.end()) {
      throw DataError(str(origin.merge_where(k), ": symbol ", quote(b), " is not in ", enc));
    }
    auto ir = encoder.find(a + b);
    if (ir == encoder.end()) {
      throw DataError(
          str(origin.merge_where(k), ": merge result ", quote(a + b), " is not in ", enc));
    }
    if (ir->second == impl->eos_id) {
      throw DataError(str(origin.merge_where(k), ": merge ", quote(a + " " + b),
                          " produces the end-of-text token"));
    }
    const uint64_t key = pair_key(ia->second, ib->second);
    auto [it, inserted] = first_index.emplace(key, k);
    if (!inserted) {
      throw DataError(str(origin.merge_where(k), ": duplicate merge ", quote(a + " " + b),
                          " (first at ", origin.merge_where(it->second), ")"));
    }
    impl->merge_table.emplace(key, MergeInfo{static_cast<int32_t>(k), ir->second});
  }

  Fnv1a64 h;
  h.u64(impl->tokens.size());
  for (const std::string& t : impl->tokens) h.text(t);
  h.u64(merges.size());
  for (const auto& [a, b] : merges) {
    h.text(a);
    h.text(b);
  }
  h.text(eos);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h.h));
  impl->fingerprint = hex;
  impl->base_fingerprint = hex;

  impl->encoder = std::move(encoder);
  impl->merges = std::move(merges);
  impl->eos = std::move(eos);
  return impl;
}

// GPT-2's bpe(): repeatedly take the lowest-ranked adjacent pair and merge all of its
// non-overlapping occurrences left to right. Done with a heap of candidates over a linked list so
// that long pieces cost O(n log n) instead of O(n^2) per round; a round pops every candidate of
// the current rank (in position order) before pushing the pairs it created, which keeps the
// result identical to the reference loop even for merge tables whose ranks are not in creation
// order.
void ByteLevelBpe::Impl::bpe(std::string_view piece, size_t offset,
                             std::vector<int32_t>& out) const {
  if (piece.size() >= static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    throw DataError(str("cannot encode a pre-token of ", piece.size(), " bytes at byte offset ",
                        offset, ": expected pre-tokens below 2 GiB"));
  }
  const int32_t n = static_cast<int32_t>(piece.size());
  if (ignore_merges) {
    const ByteAlphabet& alphabet = byte_alphabet();
    std::string symbols;
    for (char c : piece) symbols += alphabet.symbol[static_cast<unsigned char>(c)];
    auto it = encoder.find(symbols);
    if (it != encoder.end() && it->second != eos_id) {
      out.push_back(it->second);
      return;
    }
  }
  nodes.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(piece[i]);
    const int32_t id = byte_id[c];
    if (id < 0) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "0x%02x", c);
      throw DataError(str("cannot encode byte ", buf, " at byte offset ", offset + i,
                          " of the text: the tokenizer's encoder has no symbol for it"));
    }
    nodes[i] = Node{id, i - 1, i + 1 < n ? i + 1 : -1};
  }
  heap.clear();
  deferred.clear();
  CandidateAfter after;
  for (int32_t i = 0; i + 1 < n; ++i) {
    if (const MergeInfo* m = find_merge(nodes[i].id, nodes[i + 1].id)) {
      heap.push_back(Candidate{m->rank, i, nodes[i].id, nodes[i + 1].id, m->result});
    }
  }
  std::make_heap(heap.begin(), heap.end(), after);

  auto valid = [&](const Candidate& c) {
    const Node& left = nodes[c.pos];
    return left.id == c.left && left.next >= 0 && nodes[left.next].id == c.right;
  };
  auto apply = [&](const Candidate& c) {
    const int32_t result = c.result;
    Node& left = nodes[c.pos];
    Node& right = nodes[left.next];
    left.id = result;
    right.id = -1;
    left.next = right.next;
    if (left.next >= 0) nodes[left.next].prev = c.pos;
    if (left.prev >= 0) {
      const int32_t p = left.prev;
      if (const MergeInfo* m = find_merge(nodes[p].id, result)) {
        deferred.push_back(Candidate{m->rank, p, nodes[p].id, result, m->result});
      }
    }
    if (left.next >= 0) {
      const int32_t q = left.next;
      if (const MergeInfo* m = find_merge(result, nodes[q].id)) {
        deferred.push_back(Candidate{m->rank, c.pos, result, nodes[q].id, m->result});
      }
    }
  };

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), after);
    const Candidate first = heap.back();
    heap.pop_back();
    if (!valid(first)) continue;
    apply(first);
    while (!heap.empty() && heap.front().rank == first.rank) {
      std::pop_heap(heap.begin(), heap.end(), after);
      const Candidate c = heap.back();
      heap.pop_back();
      if (valid(c)) apply(c);
    }
    for (const Candidate& c : deferred) {
      heap.push_back(c);
      std::push_heap(heap.begin(), heap.end(), after);
    }
    deferred.clear();
  }
  for (int32_t i = 0; i >= 0; i = nodes[i].next) out.push_back(nodes[i].id);
}

ByteLevelBpe::ByteLevelBpe(std::unordered_map<std::string, int32_t> encoder,
                           std::vector<std::pair<std::string, std::string>> merges,
                           std::string eos_token)
    : impl_(Impl::build(std::move(encoder), std::move(merges), std::move(eos_token),
                        Origin{"encoder table", "merge table", {}})) {}

ByteLevelBpe::ByteLevelBpe(ByteLevelBpe&&) noexcept = default;
ByteLevelBpe& ByteLevelBpe::operator=(ByteLevelBpe&&) noexcept = default;
ByteLevelBpe::~ByteLevelBpe() = default;

ByteLevelBpe ByteLevelBpe::from_files(const std::string& encoder_json_path,
                                      const std::string& vocab_bpe_path,
                                      const std::string& eos_token) {
  // encoder.json: one object {token: id}. nlohmann keeps the last of duplicate keys silently, so
  // the parse callback catches them (a duplicate usually means a corrupted or hand-merged file).
  const std::string enc_text = read_file(encoder_json_path, "encoder");
  std::unordered_set<std::string> seen;
  auto on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second) {
        throw DataError(
            str(encoder_json_path, ": duplicate key ", quote(key), ", expected each token once"));
      }
    }
    return true;
  };
  json doc;
  try {
    doc = json::parse(enc_text, on_event);
  } catch (const json::parse_error& e) {
    throw DataError(
        str(encoder_json_path, ": invalid JSON at byte ", e.byte, ": ", json_error_text(e)));
  }
  if (!doc.is_object()) {
    throw DataError(
        str(encoder_json_path, ": expected a JSON object {token: id}, got ", doc.type_name()));
  }
  std::unordered_map<std::string, int32_t> encoder;
  encoder.reserve(doc.size());
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    const json& v = it.value();
    bool ok = false;
    int64_t id = -1;
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      ok = u <= static_cast<uint64_t>(std::numeric_limits<int32_t>::max() - 1);
      id = ok ? static_cast<int64_t>(u) : -1;
    } else if (v.is_number_integer()) {
      id = v.get<int64_t>();
      ok = id >= 0 && id < std::numeric_limits<int32_t>::max();
    }
    if (!ok) {
      throw DataError(str(encoder_json_path, ": token ", quote(it.key()),
                          ": expected a non-negative integer id below 2^31-1, got ",
                          json_type_and_value(v)));
    }
    encoder.emplace(it.key(), static_cast<int32_t>(id));
  }
  doc = json();

  // vocab.bpe: optional "#version" line, then "A B" per line; trailing empty lines are fine.
  const std::string bpe_text = read_file(vocab_bpe_path, "merges");
  std::vector<std::pair<std::string, std::string>> merges;
  Origin origin{encoder_json_path, vocab_bpe_path, {}};
  std::vector<std::pair<size_t, std::string_view>> lines;
  {
    std::string_view rest(bpe_text);
    size_t line_no = 0;
    while (!rest.empty()) {
      const size_t nl = rest.find('\n');
      std::string_view line = rest.substr(0, nl);
      rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);  // CRLF checkouts
      if (line_no == 1 && line.rfind("#version", 0) == 0) continue;
      lines.emplace_back(line_no, line);
    }
    while (!lines.empty() && lines.back().second.empty()) lines.pop_back();
  }
  merges.reserve(lines.size());
  origin.merge_line.reserve(lines.size());
  for (const auto& [line_no, line] : lines) {
    const size_t sp = line.find(' ');
    const bool ok = sp != std::string_view::npos && sp > 0 && sp + 1 < line.size() &&
                    line.find_first_of(" \t\r", sp + 1) == std::string_view::npos &&
                    line.find_first_of("\t\r") == std::string_view::npos;
    if (!ok) {
      throw DataError(str(vocab_bpe_path, ": line ", line_no,
                          ": expected two symbols separated by one space (\"A B\"), got ",
                          quote(line)));
    }
    merges.emplace_back(std::string(line.substr(0, sp)), std::string(line.substr(sp + 1)));
    origin.merge_line.push_back(line_no);
  }

  // Validate with file names and line numbers; the constructor then rebuilds from tables that
  // are known to be valid (the header offers no constructor from a built Impl, and the rebuild
  // costs a few tens of milliseconds even for GPT-2's 50k merges).
  std::unique_ptr<Impl> checked =
      Impl::build(std::move(encoder), std::move(merges), eos_token, origin);
  return ByteLevelBpe(std::move(checked->encoder), std::move(checked->merges), eos_token);
}

std::vector<int32_t> ByteLevelBpe::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  std::lock_guard<std::mutex> lock(impl_->mutex);
  auto& cache = impl_->cache;
  for (std::string_view piece : impl_->pretokenizer.split(text)) {
    const size_t offset = static_cast<size_t>(piece.data() - text.data());
    if (piece.size() == 1) {
      const int32_t id = impl_->byte_id[static_cast<unsigned char>(piece[0])];
      if (id >= 0) {
        ids.push_back(id);
        continue;
      }
    }
    if (piece.size() > kMaxCachedPieceBytes) {
      impl_->bpe(piece, offset, ids);
      continue;
    }
    std::string key(piece);
    auto it = cache.find(key);
    if (it != cache.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      continue;
    }
    const size_t before = ids.size();
    impl_->bpe(piece, offset, ids);
    if (cache.size() >= kMaxCacheEntries) cache.clear();
    cache.emplace(std::move(key), std::vector<int32_t>(ids.begin() + before, ids.end()));
  }
  return ids;
}

std::string ByteLevelBpe::decode(const std::vector<int32_t>& ids) const {
  const int32_t n = vocab_size();
  size_t total = 0;
  for (int32_t id : ids) {
    if (id < 0 || id >= n) {
      throw DataError(str("cannot decode token id ", id, ": expected an id in [0, ", n, ")"));
    }
    total += impl_->bytes[id].size();
  }
  std::string out;
  out.reserve(total);
  for (int32_t id : ids) out += impl_->bytes[id];
  return out;
}

int32_t ByteLevelBpe::vocab_size() const { return static_cast<int32_t>(impl_->tokens.size()); }
int32_t ByteLevelBpe::eos_id() const { return impl_->eos_id; }
size_t ByteLevelBpe::num_merges() const { return impl_->merges.size(); }
std::string ByteLevelBpe::fingerprint() const { return impl_->fingerprint; }
const std::string& ByteLevelBpe::pattern() const { return impl_->pattern; }
bool ByteLevelBpe::ignore_merges() const { return impl_->ignore_merges; }
const std::vector<std::pair<std::string, std::string>>& ByteLevelBpe::merges() const {
  return impl_->merges;
}

std::string ByteLevelBpe::token_symbols(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    throw DataError(str("token id ", id, " is outside [0, ", vocab_size(), ")"));
  }
  return impl_->tokens[id];
}

void ByteLevelBpe::set_pretokenizer(const std::string& pattern, bool ignore_merges) {
  Pretokenizer p(pattern);  // throws on a bad pattern before anything changes
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->pretokenizer = std::move(p);
  impl_->pattern = pattern == kPattern ? std::string() : pattern;
  impl_->ignore_merges = ignore_merges;
  impl_->cache.clear();
  impl_->fingerprint = impl_->base_fingerprint;
  if (!impl_->pattern.empty() || ignore_merges) {  // GPT-2 tokenizers keep their fingerprint
    Fnv1a64 h;
    h.text(impl_->base_fingerprint);
    h.text(impl_->pattern);
    h.u64(ignore_merges ? 1 : 0);
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h.h));
    impl_->fingerprint = hex;
  }
}

std::string ByteLevelBpe::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    throw DataError(str("token id ", id, " is outside [0, ", vocab_size(), ")"));
  }
  return impl_->bytes[id];
}

void ByteLevelBpe::save_files(const std::string& dir) const {
  create_dir(dir);
  // GPT-2's own layout: one line, entries in id order, non-ASCII escaped as \uXXXX.
  std::string enc = "{";
  for (size_t id = 0; id < impl_->tokens.size(); ++id) {
    if (id > 0) enc += ", ";
    enc += json(impl_->tokens[id]).dump(-1, ' ', true);
    enc += ": ";
    enc += std::to_string(id);
  }
  enc += "}";
  std::string bpe = "#version: 0.2\n";
  for (const auto& [a, b] : impl_->merges) {
    bpe += a;
    bpe += ' ';
    bpe += b;
    bpe += '\n';
  }
  write_file_atomic((fs::path(dir) / "encoder.json").string(), enc);
  write_file_atomic((fs::path(dir) / "vocab.bpe").string(), bpe);
}

// =============================================================================================
// Tokenizer

namespace {
bool known_kind(const std::string& kind) {
  return kind == "byte_bpe" || kind == "gpt2" || kind == "hf_bpe";
}
}  // namespace

Tokenizer::Tokenizer(std::string kind, ByteLevelBpe bpe)
    : kind_(std::move(kind)), bpe_(std::move(bpe)) {
  if (!known_kind(kind_)) {
    throw ConfigError(
        str("tokenizer kind ", quote(kind_),
            " is unknown, expected \"byte_bpe\", \"gpt2\" or \"hf_bpe\""));
  }
}

Tokenizer Tokenizer::load(const std::string& dir) {
  const std::string path = (fs::path(dir) / "tokenizer.json").string();
  const std::string text = read_file(path, "tokenizer config");
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::parse_error& e) {
    throw DataError(str(path, ": invalid JSON at byte ", e.byte, ": ", json_error_text(e)));
  }
  if (!doc.is_object()) {
    throw DataError(str(path, ": expected a JSON object, got ", doc.type_name()));
  }
  static const char* const kKeys[] = {"kind",  "format_version", "encoder",      "merges",
                                      "eos",   "pattern",        "ignore_merges"};
  // Unknown keys are errors so that a typo ("merge") is not silently replaced by nothing.
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    if (std::find(std::begin(kKeys), std::end(kKeys), it.key()) == std::end(kKeys)) {
      throw DataError(str(path, ": unknown key ", quote(it.key()),
                          ", expected kind, format_version, encoder, merges, eos, pattern, "
                          "ignore_merges"));
    }
  }
  auto get_string = [&](const char* key) {
    auto it = doc.find(key);
    if (it == doc.end()) throw DataError(str(path, ": missing key \"", key, "\""));
    if (!it->is_string() || it->get_ref<const std::string&>().empty()) {
      throw DataError(str(path, ": key \"", key, "\": expected a non-empty string, got ",
                          json_type_and_value(*it)));
    }
    return it->get<std::string>();
  };
  const std::string kind = get_string("kind");
  if (!known_kind(kind)) {
    throw DataError(str(path, ": key \"kind\": unknown tokenizer kind ", quote(kind),
                        ", expected \"byte_bpe\", \"gpt2\" or \"hf_bpe\""));
  }
  auto version = doc.find("format_version");
  if (version == doc.end()) throw DataError(str(path, ": missing key \"format_version\""));
  if (!version->is_number_integer() || version->get<int64_t>() != 1) {
    throw DataError(
        str(path, ": key \"format_version\": expected 1, got ", json_type_and_value(*version)));
  }
  const std::string encoder = get_string("encoder");
  const std::string merges = get_string("merges");
  const std::string eos = get_string("eos");
  // Relative paths are relative to the folder, so the folder can be moved as a whole.
  ByteLevelBpe bpe = ByteLevelBpe::from_files((fs::path(dir) / encoder).string(),
                                              (fs::path(dir) / merges).string(), eos);
  const std::string pattern = doc.contains("pattern") ? get_string("pattern") : std::string();
  bool ignore = false;
  if (auto it = doc.find("ignore_merges"); it != doc.end()) {
    if (!it->is_boolean()) {
      throw DataError(str(path, ": key \"ignore_merges\": expected true or false, got ",
                          json_type_and_value(*it)));
    }
    ignore = it->get<bool>();
  }
  if (!pattern.empty() || ignore) {
    try {
      bpe.set_pretokenizer(pattern, ignore);
    } catch (const DataError& e) {
      throw DataError(str(path, ": key \"pattern\": ", e.what()));
    }
  }
  return Tokenizer(kind, std::move(bpe));
}

void Tokenizer::save(const std::string& dir) const {
  create_dir(dir);
  bpe_.save_files(dir);
  nlohmann::ordered_json doc;
  doc["kind"] = kind_;
  doc["format_version"] = 1;
  doc["encoder"] = "encoder.json";
  doc["merges"] = "vocab.bpe";
  doc["eos"] = bpe_.token_bytes(bpe_.eos_id());
  if (!bpe_.pattern().empty()) doc["pattern"] = bpe_.pattern();
  if (bpe_.ignore_merges()) doc["ignore_merges"] = true;
  // Written last: a folder with a tokenizer.json always has the files it names.
  write_file_atomic((fs::path(dir) / "tokenizer.json").string(), doc.dump(2) + "\n");
}

std::pair<std::vector<int32_t>, std::vector<int32_t>> encode_pair(const Tokenizer& tok,
                                                                  const std::string& context_in,
                                                                  const std::string& continuation_in) {
  size_t keep = context_in.size();
  while (keep > 0 && context_in[keep - 1] == ' ') --keep;
  const std::string context = context_in.substr(0, keep);
  const std::string continuation = context_in.substr(keep) + continuation_in;
  std::vector<int32_t> ctx = tok.encode(context), cont;
  const std::vector<int32_t> whole = tok.encode(context + continuation);
  if (whole.size() > ctx.size()) {
    cont.assign(whole.begin() + static_cast<std::ptrdiff_t>(ctx.size()), whole.end());
  } else {
    cont = tok.encode(continuation);
  }
  return {std::move(ctx), std::move(cont)};
}

}  // namespace mixdiff

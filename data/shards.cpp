#include "data/shards.h"

#include <algorithm>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/json_util.h"

namespace mixdiff {

namespace {
constexpr char kMagic[8] = {'M', 'I', 'X', 'D', 'T', 'O', 'K', 'S'};
constexpr uint32_t kVersion = 1;

void put_u32(std::string& s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t get_u32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
}  // namespace

void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, ShardHeader h) {
  h.n_tokens = static_cast<int64_t>(tokens.size());
  h.dtype = h.vocab_size <= 65536 ? "uint16" : "uint32";
  nlohmann::json j = {{"dtype", h.dtype},
                      {"n_tokens", h.n_tokens},
                      {"vocab_size", h.vocab_size},
                      {"tokenizer", h.tokenizer},
                      {"tokenizer_fingerprint", h.tokenizer_fingerprint},
                      {"split", h.split}};
  if (h.n_domains > 0) {
    j["n_domains"] = h.n_domains;
    nlohmann::json runs = nlohmann::json::array();
    for (const auto& [first, id] : h.domain_runs) runs.push_back({first, id});
    j["domain_runs"] = runs;
  }
  std::string js = j.dump();
  js.append((8 - js.size() % 8) % 8, ' ');
  std::string out(kMagic, 8);
  put_u32(out, kVersion);
  put_u32(out, static_cast<uint32_t>(js.size()));
  out += js;
  const bool wide = h.dtype == "uint32";
  out.reserve(out.size() + tokens.size() * (wide ? 4 : 2));
  for (uint32_t t : tokens) {
    if (t >= static_cast<uint64_t>(h.vocab_size)) {
      throw DataError(str(path, ": token ", t, " >= vocab_size ", h.vocab_size));
    }
    out.push_back(static_cast<char>(t & 0xff));
    out.push_back(static_cast<char>((t >> 8) & 0xff));
    if (wide) {
      out.push_back(static_cast<char>((t >> 16) & 0xff));
      out.push_back(static_cast<char>((t >> 24) & 0xff));
    }
  }
  write_file_atomic(path, out);
}

ShardReader::ShardReader(const std::string& path, bool check_tokens)
    : path_(path), file_(path) {
  const uint8_t* p = file_.data();
  const size_t n = file_.size();
  if (n < 16 || std::memcmp(p, kMagic, 8) != 0) {
    throw DataError(str(path, ": not a MixDiff token shard (expected magic 'MIXDTOKS' at byte 0)"));
  }
  const uint32_t version = get_u32(p + 8);
  if (version != kVersion) {
    throw DataError(str(path, ": token shard format version ", version, ", expected ", kVersion));
  }
  const uint32_t hlen = get_u32(p + 12);
  if (16 + static_cast<size_t>(hlen) > n) {
    throw DataError(str(path, ": truncated token shard (header of ", hlen, " bytes, file has ", n,
                        ")"));
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(std::string(reinterpret_cast<const char*>(p + 16), hlen));
    header_.dtype = j.at("dtype").get<std::string>();
    header_.n_tokens = json_int(j, "n_tokens");
    header_.vocab_size = json_int(j, "vocab_size");
    header_.tokenizer = j.at("tokenizer").get<std::string>();
    header_.tokenizer_fingerprint = j.at("tokenizer_fingerprint").get<std::string>();
    header_.split = j.at("split").get<std::string>();
    if (j.contains("n_domains")) {
      header_.n_domains = json_int(j, "n_domains");
      for (const auto& r : j.at("domain_runs")) {
        if (!r.is_array() || r.size() != 2 || !r[0].is_number_integer() ||
            !r[1].is_number_integer()) {
          throw DataError(str(path, ": bad token shard header: domain_runs holds ", r.dump(),
                              " (expected [first token, domain id])"));
        }
        header_.domain_runs.emplace_back(r[0].get<int64_t>(), r[1].get<int64_t>());
      }
    }
  } catch (const nlohmann::json::exception& e) {
    throw DataError(str(path, ": bad token shard header: ", e.what()));
  }
  if (header_.dtype != "uint16" && header_.dtype != "uint32") {
    throw DataError(str(path, ": token shard dtype '", header_.dtype,
                        "' (expected uint16 or uint32)"));
  }
  if (header_.n_tokens < 0 || header_.vocab_size <= 0) {
    throw DataError(str(path, ": token shard header has n_tokens ", header_.n_tokens,
                        " and vocab_size ", header_.vocab_size));
  }
  if (header_.n_domains < 0 || header_.n_domains > 65536 ||
      (header_.n_domains > 0) != !header_.domain_runs.empty()) {
    throw DataError(str(path, ": token shard header has n_domains ", header_.n_domains, " and ",
                        header_.domain_runs.size(), " domain runs (expected 1..65536 domains "
                        "with at least one run, or neither)"));
  }
  for (size_t i = 0; i < header_.domain_runs.size(); ++i) {
    const auto [first, id] = header_.domain_runs[i];
    const bool ok = (i == 0 ? first == 0 : first > header_.domain_runs[i - 1].first) &&
                    (first < header_.n_tokens || header_.n_tokens == 0) && id >= 0 &&
                    id < header_.n_domains;
    if (!ok) {
      throw DataError(str(path, ": token shard domain run ", i, " is [", first, ", ", id,
                          "]; expected runs starting at 0, ascending below n_tokens ",
                          header_.n_tokens, ", with ids in [0, ", header_.n_domains, ")"));
    }
  }
  wide_ = header_.dtype == "uint32";
  const size_t expect = 16 + static_cast<size_t>(hlen) +
                        static_cast<size_t>(header_.n_tokens) * (wide_ ? 4 : 2);
  if (n != expect) {
    throw DataError(str(path, ": ", n < expect ? "truncated" : "oversized", " token shard: ", n,
                        " bytes, header promises ", expect));
  }
  tokens_ = p + 16 + hlen;
  if (check_tokens) {
    for (int64_t i = 0; i < header_.n_tokens; ++i) {
      if (at(i) >= header_.vocab_size) {
        throw DataError(str(path, ": token ", at(i), " at position ", i, " >= vocab_size ",
                            header_.vocab_size));
      }
    }
  }
}

void ShardReader::copy_domains(int64_t begin, int64_t n, int64_t* out) const {
  const auto& runs = header_.domain_runs;
  if (runs.empty()) {
    std::fill(out, out + n, int64_t(-1));
    return;
  }
  // The run holding `begin`, then forward.
  size_t r = static_cast<size_t>(
      std::upper_bound(runs.begin(), runs.end(), begin,
                       [](int64_t v, const std::pair<int64_t, int64_t>& run) {
                         return v < run.first;
                       }) -
      runs.begin() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = begin + i;
    while (r + 1 < runs.size() && runs[r + 1].first <= pos) ++r;
    out[i] = runs[r].second;
  }
}

void ShardReader::copy_to(int64_t begin, int64_t n, int64_t* out) const {
  if (wide_) {
    const uint32_t* t = reinterpret_cast<const uint32_t*>(tokens_) + begin;
    for (int64_t i = 0; i < n; ++i) out[i] = t[i];
  } else {
    const uint16_t* t = reinterpret_cast<const uint16_t*>(tokens_) + begin;
    for (int64_t i = 0; i < n; ++i) out[i] = t[i];
  }
}

}  // namespace mixdiff

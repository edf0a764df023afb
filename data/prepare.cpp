#include "data/prepare.h"
#include "core/hash.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <sstream>
#include <nlohmann/json.hpp>
#include <ostream>
#include <unistd.h>

#include "core/errors.h"
#include "core/json_util.h"
#include "core/fs.h"
#include "data/shards.h"

namespace mixdiff {

namespace fs = std::filesystem;

CorpusRegistry& corpora_registry() {
  static CorpusRegistry r("corpora", "plain-text document sources for `mixdiff data prepare`");
  return r;
}

TokenizerBuilderRegistry& tokenizer_builders() {
  static TokenizerBuilderRegistry r("tokenizers", "how `mixdiff data prepare` makes a tokenizer");
  return r;
}

namespace {

// Shards hold at most this many tokens so that one file stays well below any size limit.
constexpr int64_t kShardTokens = int64_t(1) << 26;

struct PreparedSpec {
  std::string path;
  std::string spec_yaml;
  std::vector<std::unique_ptr<Corpus>> corpora;
  std::vector<int64_t> corpus_domain;  ///< per corpus: its domain id
  std::vector<std::string> domains;
  std::unique_ptr<TokenizerBuilder> tokenizer;
  double val_fraction = 0.01;
  int64_t seed = 0;
  int64_t shard_tokens = kShardTokens;
};

PreparedSpec read_spec(const ConfigNode& data_cfg) {
  PreparedSpec s;
  s.path = data_cfg.get<std::string>("path");
  ConfigNode prep = data_cfg.at("prepare");
  ConfigNode corpora = prep.at("corpora");
  if (!corpora.is_sequence() || corpora.size() == 0) {
    prep.fail("corpora", "expected a non-empty list of {kind: ...} entries");
  }
  for (size_t i = 0; i < corpora.size(); ++i) {
    ConfigNode c = corpora[i];
    const std::string kind = c.get<std::string>("kind");
    s.corpora.push_back(corpora_registry().create(kind, c.path() + ".kind", c));
    // The domain every document of this corpus belongs to (expert specialisation by domain).
    const std::string domain = c.get<std::string>("domain", kind);
    if (domain.empty()) c.fail("domain", "expected a non-empty domain name");
    auto it = std::find(s.domains.begin(), s.domains.end(), domain);
    s.corpus_domain.push_back(it - s.domains.begin());
    if (it == s.domains.end()) s.domains.push_back(domain);
  }
  ConfigNode tok = prep.at("tokenizer");
  s.tokenizer = tokenizer_builders().create(tok.get<std::string>("kind"), tok.path() + ".kind", tok);
  s.val_fraction = prep.get<double>("val_fraction", 0.01);
  if (!(s.val_fraction > 0 && s.val_fraction < 0.5)) {
    prep.fail("val_fraction", str("expected a fraction in (0, 0.5), got ", s.val_fraction));
  }
  s.seed = prep.get<int64_t>("seed", 0);
  s.shard_tokens = prep.get<int64_t>("shard_tokens", kShardTokens);
  if (s.shard_tokens < 1) prep.fail("shard_tokens", "expected a positive number of tokens per shard");
  s.spec_yaml = canonical_yaml(prep.to_yaml());
  return s;
}

// Every non-empty document of the spec's corpora in order, with its domain id and split (a
// seeded hash of its index: the same documents are held out whenever the spec is replayed).
void split_documents(
    const PreparedSpec& spec,
    const std::function<void(std::string_view, int64_t, bool, const DocumentFields&)>& fn) {
  int64_t doc_index = 0;
  for (size_t c = 0; c < spec.corpora.size(); ++c) {
    spec.corpora[c]->for_each_record([&](std::string_view d, const DocumentFields& f) {
      if (d.empty()) return;
      const uint64_t h = splitmix64(static_cast<uint64_t>(spec.seed) * 0x632be59bd9b4e019ULL ^
                                    static_cast<uint64_t>(doc_index++));
      fn(d, spec.corpus_domain[c], static_cast<double>(h >> 11) * 0x1.0p-53 < spec.val_fraction,
         f);
    });
  }
}

/// Domain runs of one split: (first token, domain id), a new run where the domain changes.
using DomainRuns = std::vector<std::pair<int64_t, int64_t>>;

void write_shards(const std::string& dir, const std::string& stem,
                  const std::vector<uint32_t>& tokens, const DomainRuns& runs,
                  const ShardHeader& base, int64_t shard_tokens, std::vector<std::string>* names) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  int64_t n_shards = std::max<int64_t>(1, (n + shard_tokens - 1) / shard_tokens);
  size_t r = 0;  // the run holding the shard's first token
  for (int64_t s = 0; s < n_shards; ++s) {
    const int64_t b = s * shard_tokens, e = std::min(n, b + shard_tokens);
    std::vector<uint32_t> part(tokens.begin() + b, tokens.begin() + e);
    ShardHeader h = base;
    while (r + 1 < runs.size() && runs[r + 1].first <= b) ++r;
    for (size_t k = r; k < runs.size() && runs[k].first < e; ++k) {
      h.domain_runs.emplace_back(std::max<int64_t>(0, runs[k].first - b), runs[k].second);
    }
    std::ostringstream name;
    name << stem << "_" << std::setw(3) << std::setfill('0') << s << ".bin";
    write_shard(dir + "/" + name.str(), part, h);
    names->push_back(name.str());
  }
}

}  // namespace

double unigram_entropy(const std::vector<int64_t>& counts) {
  double total = 0;
  for (int64_t c : counts) total += static_cast<double>(c);
  if (total <= 0) return 0;
  double h = 0;
  for (int64_t c : counts) {
    if (c > 0) {
      const double p = static_cast<double>(c) / total;
      h -= p * std::log(p);
    }
  }
  return h;
}

std::string resolve_prepare_spec(const ConfigNode& data_cfg) { return read_spec(data_cfg).spec_yaml; }

void for_each_split_document(const std::string& dataset_path,
                             const std::function<void(const SplitDocument&)>& fn) {
  const DatasetInfo info = read_dataset_info(dataset_path);
  // {path: ..., prepare: <the spec>}: the spec's lines indented under `prepare:`.
  std::string text = "path: " + nlohmann::json(dataset_path).dump() + "\nprepare:\n";
  std::istringstream lines(info.spec_yaml);
  for (std::string line; std::getline(lines, line);) text += "  " + line + "\n";
  const ConfigNode cfg = ConfigNode::from_string(text, dataset_path + "/meta.json (spec)");
  const PreparedSpec spec = read_spec(cfg);
  split_documents(spec, [&](std::string_view d, int64_t domain, bool val,
                            const DocumentFields& f) {
    fn(SplitDocument{d, spec.domains[static_cast<size_t>(domain)], val, f});
  });
}

DatasetInfo read_dataset_info(const std::string& path) {
  const std::string meta = path + "/meta.json";
  if (!fs::exists(meta)) {
    throw DataError(str("data.path: '", path,
                        "' holds no prepared dataset (no meta.json); expected a folder made by "
                        "`mixdiff data prepare RECIPE`"));
  }
  DatasetInfo d;
  d.path = path;
  try {
    auto j = nlohmann::json::parse(read_file(meta, "dataset meta.json"));
    // Compared in canonical form: the layout of the recipe that made the data (flow or block
    // style, key order) does not matter, and datasets made before specs were canonical still
    // match.
    d.spec_yaml = canonical_yaml(j.at("spec").get<std::string>());
    d.tokenizer_kind = j.at("tokenizer").get<std::string>();
    d.tokenizer_fingerprint = j.at("tokenizer_fingerprint").get<std::string>();
    d.vocab_size = json_int(j, "vocab_size");
    d.eos_id = json_int(j, "eos_id");
    d.train_tokens = json_int(j, "train_tokens");
    d.val_tokens = json_int(j, "val_tokens");
    d.train_docs = json_int(j, "train_docs");
    d.val_docs = json_int(j, "val_docs");
    d.val_unigram_entropy = j.at("val_unigram_entropy_nats").get<double>();
    d.train_shards = j.at("train_shards").get<std::vector<std::string>>();
    d.val_shards = j.at("val_shards").get<std::vector<std::string>>();
    d.domains = j.value("domains", std::vector<std::string>{});
    d.train_domain_tokens = j.value("train_domain_tokens", std::vector<int64_t>{});
    d.val_domain_tokens = j.value("val_domain_tokens", std::vector<int64_t>{});
  } catch (const ConfigError& e) {
    throw DataError(str(meta, ": malformed dataset metadata: spec: ", e.what()));
  } catch (const nlohmann::json::exception& e) {
    throw DataError(str(meta, ": malformed dataset metadata: ", e.what()));
  }
  return d;
}

DatasetInfo prepare_dataset(const ConfigNode& data_cfg, bool force, std::ostream& log) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  PreparedSpec spec = read_spec(data_cfg);
  if (fs::exists(spec.path + "/meta.json") && !force) {
    DatasetInfo existing = read_dataset_info(spec.path);
    if (existing.spec_yaml == spec.spec_yaml) {
      log << "data: " << spec.path << " is already prepared from this spec ("
          << existing.train_tokens << " train tokens); use --force to rebuild\n";
      return existing;
    }
    throw DataError(str("data.path: '", spec.path,
                        "' was prepared from a different data.prepare spec; use --force to "
                        "rebuild it or choose another data.path"));
  }

  // 1. Documents, split into train and validation by a seeded hash of their index.
  std::vector<std::string> docs;
  std::vector<char> is_val;
  std::vector<int64_t> doc_domain;
  int64_t bytes = 0;
  split_documents(spec, [&](std::string_view d, int64_t domain, bool val, const DocumentFields&) {
    doc_domain.push_back(domain);
    is_val.push_back(val);
    docs.emplace_back(d);
    bytes += static_cast<int64_t>(d.size());
  });
  if (docs.empty()) throw DataError("data.prepare.corpora: the corpora yielded no documents");
  log << "data: " << docs.size() << " documents, " << std::fixed << std::setprecision(1)
      << bytes / 1e6 << " MB of text\n";

  // 2. Tokenizer (trained on the training documents only, when it is trained at all).
  if (spec.tokenizer->wants_text()) {
    for (size_t i = 0; i < docs.size(); ++i) {
      if (!is_val[i]) spec.tokenizer->add_text(docs[i]);
    }
  }
  Tokenizer tok = spec.tokenizer->build();
  const auto t1 = clock::now();
  log << "data: tokenizer " << tok.kind() << " with " << tok.vocab_size() << " tokens ("
      << std::setprecision(1) << std::chrono::duration<double>(t1 - t0).count() << " s)\n";

  // 3. Encode; every document ends with EOS.
  std::vector<uint32_t> train, val;
  DomainRuns train_runs, val_runs;
  const size_t n_domains = spec.domains.size();
  std::vector<int64_t> train_domain_tokens(n_domains, 0), val_domain_tokens(n_domains, 0);
  std::vector<int64_t> val_counts(static_cast<size_t>(tok.vocab_size()), 0);
  int64_t train_docs = 0, val_docs = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    std::vector<int32_t> ids = tok.encode(docs[i]);
    ids.push_back(tok.eos_id());
    auto& dst = is_val[i] ? val : train;
    auto& runs = is_val[i] ? val_runs : train_runs;
    if (runs.empty() || runs.back().second != doc_domain[i]) {
      runs.emplace_back(static_cast<int64_t>(dst.size()), doc_domain[i]);
    }
    (is_val[i] ? val_domain_tokens : train_domain_tokens)[static_cast<size_t>(doc_domain[i])] +=
        static_cast<int64_t>(ids.size());
    for (int32_t id : ids) dst.push_back(static_cast<uint32_t>(id));
    if (is_val[i]) {
      ++val_docs;
      for (int32_t id : ids) ++val_counts[static_cast<size_t>(id)];
    } else {
      ++train_docs;
    }
    std::string().swap(docs[i]);
  }
  if (val.empty() || train.empty()) {
    throw DataError(str("data.prepare: split gave ", train.size(), " train and ", val.size(),
                        " validation tokens; both must be non-empty (adjust val_fraction)"));
  }

  // 4. Write everything into a temporary folder, then move it into place.
  const std::string tmp = spec.path + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  tok.save(tmp + "/tokenizer");
  ShardHeader base;
  base.vocab_size = tok.vocab_size();
  base.tokenizer = tok.kind();
  base.tokenizer_fingerprint = tok.fingerprint();
  base.n_domains = static_cast<int64_t>(n_domains);
  DatasetInfo info;
  info.path = spec.path;
  info.spec_yaml = spec.spec_yaml;
  info.tokenizer_kind = tok.kind();
  info.tokenizer_fingerprint = tok.fingerprint();
  info.vocab_size = tok.vocab_size();
  info.eos_id = tok.eos_id();
  info.train_tokens = static_cast<int64_t>(train.size());
  info.val_tokens = static_cast<int64_t>(val.size());
  info.train_docs = train_docs;
  info.val_docs = val_docs;
  info.val_unigram_entropy = unigram_entropy(val_counts);
  info.domains = spec.domains;
  info.train_domain_tokens = train_domain_tokens;
  info.val_domain_tokens = val_domain_tokens;
  base.split = "train";
  write_shards(tmp, "train", train, train_runs, base, spec.shard_tokens, &info.train_shards);
  base.split = "val";
  write_shards(tmp, "val", val, val_runs, base, spec.shard_tokens, &info.val_shards);
  nlohmann::json j = {{"format_version", 1},
                      {"spec", info.spec_yaml},
                      {"tokenizer", info.tokenizer_kind},
                      {"tokenizer_fingerprint", info.tokenizer_fingerprint},
                      {"vocab_size", info.vocab_size},
                      {"eos_id", info.eos_id},
                      {"train_tokens", info.train_tokens},
                      {"val_tokens", info.val_tokens},
                      {"train_docs", info.train_docs},
                      {"val_docs", info.val_docs},
                      {"text_bytes", bytes},
                      {"val_unigram_entropy_nats", info.val_unigram_entropy},
                      {"train_shards", info.train_shards},
                      {"val_shards", info.val_shards},
                      {"domains", info.domains},
                      {"train_domain_tokens", info.train_domain_tokens},
                      {"val_domain_tokens", info.val_domain_tokens}};
  write_file_atomic(tmp + "/meta.json", j.dump(2) + "\n");
  if (fs::exists(spec.path)) fs::remove_all(spec.path);
  if (!fs::path(spec.path).parent_path().empty()) {
    fs::create_directories(fs::path(spec.path).parent_path());
  }
  fs::rename(tmp, spec.path);
  const auto t2 = clock::now();
  log << "data: wrote " << spec.path << ": " << info.train_tokens << " train tokens ("
      << train_docs << " docs), " << info.val_tokens << " validation tokens (" << val_docs
      << " docs) in " << n_domains << " domain" << (n_domains == 1 ? "" : "s") << " (";
  for (size_t d = 0; d < n_domains; ++d) {
    log << (d ? ", " : "") << spec.domains[d] << " " << train_domain_tokens[d] << "/"
        << val_domain_tokens[d];
  }
  log << " train/validation tokens), validation unigram entropy " << std::setprecision(3)
      << info.val_unigram_entropy << " nats/token (" << std::setprecision(1)
      << std::chrono::duration<double>(t2 - t0).count() << " s)\n";
  return info;
}

}  // namespace mixdiff

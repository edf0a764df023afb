// Token shards, dataset preparation and the built-in corpora.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <unistd.h>
#include <sstream>

#include "core/errors.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "train/data_source.h"
#include "support/support.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

ShardHeader header(int64_t vocab) {
  ShardHeader h;
  h.vocab_size = vocab;
  h.tokenizer = "byte_bpe";
  h.tokenizer_fingerprint = "0123456789abcdef";
  h.split = "train";
  return h;
}

std::string data_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const DataError& e) {
    return e.what();
  }
  return "";
}

TEST(UnitShards, RoundTripBothDtypes) {
  const std::string d = test::scratch_dir("shards_rt");
  std::vector<uint32_t> toks{0, 1, 2, 65535, 7};
  write_shard(d + "/a.bin", toks, header(65536));
  ShardReader a(d + "/a.bin");
  EXPECT_EQ(a.header().dtype, "uint16");
  ASSERT_EQ(a.size(), 5);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(a.at(i), toks[i]);
  toks.push_back(100000);
  write_shard(d + "/b.bin", toks, header(100001));
  ShardReader b(d + "/b.bin");
  EXPECT_EQ(b.header().dtype, "uint32");
  std::vector<int64_t> out(6);
  b.copy_to(0, 6, out.data());
  EXPECT_EQ(out[5], 100000);
}

TEST(UnitShards, TruncatedOrCorruptShardIsRefused) {
  const std::string d = test::scratch_dir("shards_bad");
  write_shard(d + "/a.bin", {1, 2, 3, 4}, header(10));
  const std::string full = test::read_text(d + "/a.bin");
  test::write_text(d + "/t.bin", full.substr(0, full.size() - 1));
  EXPECT_NE(data_error([&] { ShardReader r(d + "/t.bin"); }).find("truncated token shard"),
            std::string::npos);
  test::write_text(d + "/m.bin", "NOTASHARD" + full.substr(9));
  EXPECT_NE(data_error([&] { ShardReader r(d + "/m.bin"); }).find("not a MixDiff token shard"),
            std::string::npos);
  std::string big = full;
  big[big.size() - 2] = 9;  // token 9 is fine
  big[big.size() - 1] = 1;  // -> 256 + 9 >= vocab 10
  test::write_text(d + "/v.bin", big);
  EXPECT_NE(data_error([&] { ShardReader r(d + "/v.bin"); }).find(">= vocab_size 10"),
            std::string::npos);
  EXPECT_THROW(write_shard(d + "/w.bin", {11}, header(10)), DataError);
}

TEST(UnitPrepare, UnigramEntropyByHand) {
  EXPECT_NEAR(unigram_entropy({1, 1, 1, 1}), std::log(4.0), 1e-12);
  EXPECT_NEAR(unigram_entropy({3, 1, 0}), -(0.75 * std::log(0.75) + 0.25 * std::log(0.25)), 1e-12);
  EXPECT_EQ(unigram_entropy({5}), 0.0);
}

TEST(UnitPrepare, PreparesOnceAndRefusesAChangedSpec) {
  const std::string d = test::scratch_dir("prepare");
  const std::string recipe = test::tiny_setup(d, d + "/data");
  DatasetInfo info = read_dataset_info(d + "/data");
  EXPECT_EQ(info.vocab_size, 320);
  EXPECT_GT(info.train_tokens, 500);
  EXPECT_GT(info.val_tokens, 0);
  EXPECT_GT(info.val_unigram_entropy, 0);
  ShardReader s(d + "/data/" + info.train_shards.at(0));
  EXPECT_EQ(s.header().tokenizer_fingerprint, info.tokenizer_fingerprint);
  // The same spec again is a no-op; a different one is refused without --force.
  ConfigNode r = ConfigNode::from_file(recipe);
  std::ostringstream log;
  prepare_dataset(r.at("data"), false, log);
  EXPECT_NE(log.str().find("already prepared"), std::string::npos);
  // The same spec in another layout (block style, other key order) is the same spec, for
  // `data prepare` and for training.
  const std::string corpus = test::fixtures_dir() + "/tiny_corpus.txt";
  const ConfigNode block = ConfigNode::from_string(
      "kind: token_shards\npath: " + d + "/data\nseq_len: 32\nprepare:\n  val_fraction: 0.2\n"
      "  tokenizer:\n    min_frequency: 1\n    vocab_size: 320\n    kind: byte_bpe\n"
      "  corpora:\n    - kind: text_files\n      paths:\n        - " + corpus + "\n        - " +
      corpus + "\n        - " + corpus + "\n        - " + corpus + "\n",
      "block.yaml");
  std::ostringstream log_block;
  prepare_dataset(block, false, log_block);
  EXPECT_NE(log_block.str().find("already prepared"), std::string::npos) << log_block.str();
  EXPECT_EQ(build_data_source(block)->vocab_size(), 320);
  ConfigNode r2 = ConfigNode::from_file(recipe);
  r2.apply_override("data.prepare.val_fraction=0.3");
  EXPECT_NE(data_error([&] { prepare_dataset(r2.at("data"), false, log); })
                .find("prepared from a different data.prepare spec"),
            std::string::npos);
  prepare_dataset(r2.at("data"), true, log);
  EXPECT_NE(read_dataset_info(d + "/data").spec_yaml, info.spec_yaml);
  EXPECT_FALSE(fs::exists(d + "/data.tmp-" + std::to_string(::getpid())));
}

TEST(UnitPrepare, Gpt2FilesTokenizeTheCorpus) {
  const std::string d = test::scratch_dir("prepare_gpt2");
  std::string text;
  for (int i = 0; i < 40; ++i) text += "the cat sat on the mat\n\n";
  test::write_text(d + "/corpus.txt", text);
  ConfigNode r = ConfigNode::from_string(
      "path: " + d + "/data\nprepare:\n  corpora: [{kind: text_files, paths: [" + d +
          "/corpus.txt]}]\n  tokenizer: {kind: gpt2, dir: " + test::fixtures_dir() +
          "/gpt2_tiny}\n  val_fraction: 0.25\n",
      "data.yaml");
  std::ostringstream log;
  DatasetInfo info = prepare_dataset(r, false, log);
  r.at("prepare").check_unknown_keys();
  EXPECT_EQ(info.tokenizer_kind, "gpt2");
  EXPECT_EQ(info.vocab_size, 23);
  // "the cat sat on the mat" is 7 tokens in the fixture, plus EOS per document.
  EXPECT_EQ((info.train_tokens + info.val_tokens), 40 * 8);
  ShardReader s(d + "/data/" + info.train_shards.at(0));
  EXPECT_EQ(s.at(0), 20u);
  EXPECT_EQ(s.at(7), static_cast<uint32_t>(info.eos_id));
}

TEST(UnitPrepare, MissingDataIsNamed) {
  EXPECT_NE(data_error([] { read_dataset_info("/nonexistent/data"); })
                .find("holds no prepared dataset"),
            std::string::npos);
}

// Every token carries the domain of its document (the corpus's `domain:`), through the split,
// the shard boundaries (tiny shards here) and the windows that training, validation and
// data-parallel ranks read. Domain a's documents use only the letters x, y, z and domain b's only
// q, r, s, so each token's text tells its domain.
TEST(UnitPrepare, DomainIdsSurvivePreparationShardingAndDataParallelReading) {
  const std::string d = test::scratch_dir("prepare_domains");
  std::string a, b;
  uint64_t state = 7;
  auto word = [&](const char* letters) {
    std::string w;
    for (int i = 0; i < 3 + static_cast<int>(state % 4); ++i) {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      w += letters[(state >> 33) % 3];
    }
    return w;
  };
  for (int doc = 0; doc < 150; ++doc) {
    for (int w = 0; w < 6; ++w) a += word("xyz") + (w < 5 ? " " : "\n");
    for (int w = 0; w < 6; ++w) b += word("qrs") + (w < 5 ? " " : "\n");
  }
  test::write_text(d + "/a.txt", a);
  test::write_text(d + "/b.txt", b);
  ConfigNode r = ConfigNode::from_string(
      "kind: token_shards\npath: " + d + "/data\nseq_len: 16\nprepare:\n  corpora:\n"
      "    - {kind: text_files, paths: [" + d + "/a.txt], split: line, domain: a}\n"
      "    - {kind: text_files, paths: [" + d + "/b.txt], split: line, domain: b}\n"
      "  tokenizer: {kind: byte_bpe, vocab_size: 300, min_frequency: 1}\n"
      "  val_fraction: 0.2\n  shard_tokens: 97\n",
      "domains.yaml");
  std::ostringstream log;
  DatasetInfo info = prepare_dataset(r, false, log);
  EXPECT_EQ(info.domains, (std::vector<std::string>{"a", "b"}));
  EXPECT_GT(info.train_shards.size(), 5u) << "tiny shards: the runs cross shard boundaries";
  ASSERT_EQ(info.train_domain_tokens.size(), 2u);
  EXPECT_EQ(info.train_domain_tokens[0] + info.train_domain_tokens[1], info.train_tokens);
  EXPECT_EQ(info.val_domain_tokens[0] + info.val_domain_tokens[1], info.val_tokens);
  EXPECT_NE(log.str().find("in 2 domains (a "), std::string::npos) << log.str();
  auto src = build_data_source(r);
  ASSERT_EQ(src->domains(), info.domains);
  Tokenizer tok = Tokenizer::load(src->tokenizer_dir());
  auto expect_domains = [&](const at::Tensor& x, const at::Tensor& dom, const char* what) {
    ASSERT_TRUE(dom.defined()) << what;
    ASSERT_EQ(x.sizes(), dom.sizes()) << what;
    int64_t checked = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const int64_t t = x.view({-1})[i].item<int64_t>(), dm = dom.view({-1})[i].item<int64_t>();
      ASSERT_TRUE(dm == 0 || dm == 1) << what << " token " << i << ": domain " << dm;
      if (t == src->eos_id()) continue;
      const std::string text = tok.decode({static_cast<int32_t>(t)});
      const bool in_a = text.find_first_of("xyz") != std::string::npos;
      const bool in_b = text.find_first_of("qrs") != std::string::npos;
      if (!in_a && !in_b) continue;  // a space
      ASSERT_NE(in_a, in_b) << what << ": token '" << text << "' mixes the domains";
      EXPECT_EQ(dm, in_a ? 0 : 1) << what << " token " << i << " '" << text << "'";
      ++checked;
    }
    EXPECT_GT(checked, x.numel() / 2) << what;
  };
  // Training windows over several epochs (other offsets and permutations).
  const int64_t n_windows = info.train_tokens / 16;
  for (int64_t first : {int64_t(0), n_windows - 3, 2 * n_windows + 5}) {
    expect_domains(src->train_batch(first, 8), src->train_domains(first, 8), "train");
  }
  expect_domains(src->val_sequences(64), src->val_domains(64), "val");
  // Data parallelism: rank r of 2 reads rows [r B, (r + 1) B) of the global micro-batch; its
  // domains are those rows' domains.
  auto global = src->train_domains(40, 8);
  for (int64_t rank = 0; rank < 2; ++rank) {
    EXPECT_TRUE(torch::equal(src->train_domains(40 + rank * 4, 4), global.narrow(0, rank * 4, 4)));
  }
  // Both domains appear in the training stream.
  auto all = src->train_domains(0, n_windows);
  EXPECT_GT((all == 0).sum().item<int64_t>(), 0);
  EXPECT_GT((all == 1).sum().item<int64_t>(), 0);
}

TEST(UnitShards, BadDomainRunsAreRefused) {
  const std::string d = test::scratch_dir("shards_domains");
  ShardHeader h = header(10);
  h.n_domains = 2;
  h.domain_runs = {{0, 1}, {3, 0}};
  write_shard(d + "/ok.bin", {1, 2, 3, 4, 5}, h);
  ShardReader ok(d + "/ok.bin");
  std::vector<int64_t> out(4);
  ok.copy_domains(1, 4, out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{1, 1, 0, 0}));
  h.domain_runs = {{0, 1}, {3, 0}, {2, 1}};  // not ascending
  write_shard(d + "/desc.bin", {1, 2, 3, 4, 5}, h);
  EXPECT_NE(data_error([&] { ShardReader r(d + "/desc.bin"); }).find("domain run 2 is [2, 1]"),
            std::string::npos);
  h.domain_runs = {{0, 2}};  // id out of range
  write_shard(d + "/id.bin", {1, 2, 3}, h);
  EXPECT_NE(data_error([&] { ShardReader r(d + "/id.bin"); }).find("ids in [0, 2)"),
            std::string::npos);
  // Unlabelled shards read as -1.
  write_shard(d + "/none.bin", {1, 2}, header(10));
  ShardReader none(d + "/none.bin");
  none.copy_domains(0, 2, out.data());
  EXPECT_EQ(out[0], -1);
}

// The default corpora come from Debian packages that tools/setup.sh installs.
TEST(UnitCorpora, BuiltInCorporaYieldEnglishDocuments) {
  for (const char* kind : {"kjv", "fortunes", "wordnet"}) {
    ConfigNode c = ConfigNode::from_string(std::string("kind: ") + kind + "\n", "t.yaml");
    auto corpus = corpora_registry().create(kind, "kind", c);
    int64_t docs = 0, bytes = 0, with_the = 0;
    corpus->for_each_document([&](std::string_view d) {
      ++docs;
      bytes += static_cast<int64_t>(d.size());
      with_the += d.find(" the ") != std::string_view::npos;
      for (char ch : d) {
        ASSERT_TRUE(static_cast<unsigned char>(ch) >= 0x20 || ch == '\n' || ch == '\t')
            << kind << ": control character in a document";
      }
    });
    EXPECT_GT(docs, 1000) << kind;
    EXPECT_GT(bytes, 1000000) << kind;
    EXPECT_GT(with_the, docs / 10) << kind << ": does not look like English";
  }
  ConfigNode c = ConfigNode::from_string("kind: kjv\n", "t.yaml");
  std::string first;
  corpora_registry().create("kjv", "kind", c)->for_each_document([&](std::string_view d) {
    if (first.empty()) first = std::string(d.substr(0, 58));
  });
  EXPECT_EQ(first, "In the beginning God created the heaven and the earth. And");
}

TEST(UnitCorpora, MissingCorpusSourceIsAClearError) {
  ConfigNode c = ConfigNode::from_string("kind: fortunes\ndir: /nonexistent\n", "t.yaml");
  auto corpus = corpora_registry().create("fortunes", "kind", c);
  EXPECT_NE(data_error([&] { corpus->for_each_document([](std::string_view) {}); })
                .find("install the Debian package fortunes"),
            std::string::npos);
}

}  // namespace
}  // namespace mixdiff

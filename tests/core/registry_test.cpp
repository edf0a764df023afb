// Registries: the built-in names survive static linking (WHOLE_ARCHIVE), unknown names list the
// known ones, duplicates are refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "app/app.h"
#include "core/registry.h"
#include "support/support.h"

namespace mixdiff {
namespace {

TEST(UnitRegistry, EveryExtensionPointHasItsBuiltIns) {
  std::map<std::string, std::set<std::string>> want = {
      {"models", {"dense_dlm", "moe_dlm", "unipool_dlm", "coe_dlm", "rexmoe_dlm"}},
      {"routers", {"token_choice", "top_p", "norm_router", "expert_choice"}},
      {"balancers", {"aux_free", "bip"}},
      {"block_routing", {"token", "dmoe", "des_vote", "des_seq", "admission", "interval"}},
      {"capacity_schedules", {"constant", "linear", "linear_reverse", "cosine", "cosine_reverse",
                              "bell", "bell_gaussian", "bell_gaussian_reverse"}},
      {"samplers", {"llada", "confidence_threshold", "block_diffusion"}},
      {"losses", {"masked_diffusion_elbo", "masked_ce"}},
      {"routing_losses", {"load_balance", "z_loss", "erc", "router_entropy", "pool_balance",
                          "pool_cardinality"}},
      {"dispatchers", {"sorted", "loop"}},
      {"objectives", {"masked", "block"}},
      {"schedules", {"linear", "cosine"}},
      {"data_sources", {"token_shards"}},
      {"optimizers", {"adamw"}},
      {"lr_schedules", {"warmup_cosine", "constant"}},
      {"corpora", {"kjv", "fortunes", "wordnet", "text_files"}},
      {"tokenizers", {"byte_bpe", "gpt2", "folder"}},
  };
  std::set<std::string> seen;
  for (const auto& r : list_registries()) {
    seen.insert(r.kind);
    ASSERT_TRUE(want.count(r.kind)) << "unexpected registry " << r.kind;
    std::set<std::string> names;
    for (const auto& [name, help] : r.entries) {
      names.insert(name);
      EXPECT_FALSE(help.empty()) << r.kind << "/" << name << " has no help string";
    }
    for (const auto& n : want[r.kind]) EXPECT_TRUE(names.count(n)) << r.kind << " lacks " << n;
  }
  for (const auto& [kind, _] : want) EXPECT_TRUE(seen.count(kind)) << "registry " << kind << " missing";
}

TEST(UnitRegistry, UnknownNameListsKnownNamesAndDuplicateThrows) {
  Registry<int, int> r("widgets", "test");
  r.add("b", [](int x) { return x + 1; }, "adds one");
  r.add("a", [](int x) { return x * 2; }, "doubles");
  EXPECT_EQ(r.create("b", "w.kind", 1), 2);
  try {
    r.create("c", "w.kind", 1);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "w.kind: unknown widgets 'c' (known: a, b)");
  }
  EXPECT_THROW(r.add("a", [](int x) { return x; }, "dup"), std::logic_error);
  EXPECT_EQ(r.names(), (std::vector<std::string>{"a", "b"}));
}

// The include graph points one way: src/ reaches components only through registries, the backbone
// (src/nn) knows nothing of MoE, and MoE knows nothing of diffusion or its losses.
TEST(UnitRegistry, CoreFoldersIncludeOnlyDownward) {
  namespace fs = std::filesystem;
  const std::vector<std::pair<std::string, std::vector<std::string>>> rules = {
      {"src", {"models/", "routers/", "losses/", "dispatchers/"}},
      {"src/nn", {"moe/", "model/", "diffusion/", "loss/", "train/"}},
      {"src/moe", {"diffusion/", "loss/", "model/", "train/"}},
  };
  int files = 0;
  for (const auto& [dir, banned] : rules) {
    for (const auto& e : fs::recursive_directory_iterator(test::source_dir() + "/" + dir)) {
      const auto ext = e.path().extension();
      if (ext != ".h" && ext != ".cpp") continue;
      ++files;
      std::ifstream in(e.path());
      std::string line;
      while (std::getline(in, line)) {
        if (line.rfind("#include \"", 0) != 0) continue;
        for (const auto& b : banned) {
          EXPECT_EQ(line.find("#include \"" + b), std::string::npos)
              << e.path().string() << ": " << line;
        }
      }
    }
  }
  EXPECT_GT(files, 50);
}

}  // namespace
}  // namespace mixdiff

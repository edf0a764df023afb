// Replays the fuzz corpus (tests/fuzz/corpus/<target>/: seeds, and every input a fuzzer once
// crashed on) through the fuzz targets' bodies (fuzz/targets.cpp): each input is accepted or
// refused with an InputError. tools/fuzz.sh runs the same bodies under libFuzzer + sanitizers.
#include <gtest/gtest.h>

#include <filesystem>

#include "fuzz/targets.h"
#include "support/support.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

TEST(UnitFuzzRegression, EveryCorpusInputIsAcceptedOrRefusedCleanly) {
  int replayed = 0;
  for (const auto& t : fuzz::targets()) {
    const fs::path dir = fs::path(test::source_dir()) / "tests/fuzz/corpus" / t.name;
    ASSERT_TRUE(fs::is_directory(dir)) << dir;
    int here = 0;
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string bytes = test::read_text(e.path().string());
      std::string what;
      EXPECT_TRUE(fuzz::run_one(t.name, reinterpret_cast<const uint8_t*>(bytes.data()),
                                bytes.size(), &what))
          << t.name << " " << e.path().filename().string() << ": " << what;
      ++here;
    }
    EXPECT_GT(here, 0) << "no seed for " << t.name;
    replayed += here;
  }
  EXPECT_GE(replayed, 6);
}

TEST(UnitFuzzRegression, SeedsOfEachKindAreAccepted) {
  // The seeds are valid files: they must parse (a target that refuses everything fuzzes nothing).
  for (const char* f : {"recipe/tiny.yaml", "safetensors/small", "trainer_state/trainer_state.json",
                        "shard_header/val_000.bin", "tokenizer/tiny", "override/steps"}) {
    const std::string p = test::source_dir() + "/tests/fuzz/corpus/" + f;
    const std::string bytes = test::read_text(p);
    const std::string name = std::string(f).substr(0, std::string(f).find('/'));
    for (const auto& t : fuzz::targets()) {
      if (name == t.name) {
        EXPECT_NO_THROW(t.run(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size())) << f;
      }
    }
  }
}

}  // namespace
}  // namespace mixdiff

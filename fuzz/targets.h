// The fuzz targets' bodies, shared by the libFuzzer binaries (fuzz/fuzz_main.cpp, built with
// -DMIXDIFF_FUZZ=ON and clang; tools/fuzz.sh) and the regression test that replays the corpus
// in tests/fuzz/corpus/ (tests/fuzz/fuzz_regression_test.cpp). Each parses one kind of user file
// from raw bytes. The oracle: the input is accepted, or refused with an InputError (one clear
// error line); any other exception, a crash or a sanitizer report is a bug.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mixdiff::fuzz {

void recipe(const uint8_t* data, size_t size);          ///< a recipe YAML file
void override_set(const uint8_t* data, size_t size);    ///< a --set KEY=VALUE argument
void safetensors(const uint8_t* data, size_t size);     ///< a model.safetensors file
void shard_header(const uint8_t* data, size_t size);    ///< a token shard file
void tokenizer(const uint8_t* data, size_t size);       ///< a tokenizer folder (3 files)
void trainer_state(const uint8_t* data, size_t size);   ///< a checkpoint's trainer_state.json

struct Target {
  const char* name;
  void (*run)(const uint8_t*, size_t);
};
/// Every target, by the name of its corpus folder.
const std::vector<Target>& targets();

/// Runs target `name` on the input; false when it threw something other than an InputError
/// (the message then in *what).
bool run_one(const std::string& name, const uint8_t* data, size_t size, std::string* what);

}  // namespace mixdiff::fuzz

// A checkpoint's trainer_state.json, parsed and validated without LibTorch (the fuzzer reaches it
// cheaply): format version, step, the fingerprinted file list, and the counters a resume reads.
// Any inconsistency throws CheckpointError naming the file.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

namespace mixdiff {

struct CheckpointFile {
  uint64_t bytes = 0;
  std::string fnv1a64;  ///< 16 hex digits
};

struct TrainerStateFile {
  nlohmann::json state;                          ///< the whole object
  int64_t step = 0;
  std::map<std::string, CheckpointFile> files;   ///< includes model.safetensors
};

TrainerStateFile parse_trainer_state(const std::string& text, const std::string& path,
                                     int expected_format_version);

}  // namespace mixdiff

#include "core/trainer_state.h"

#include "core/errors.h"

namespace mixdiff {

TrainerStateFile parse_trainer_state(const std::string& text, const std::string& path,
                                     int expected_format_version) {
  TrainerStateFile out;
  try {
    out.state = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(str(path, ": corrupt trainer state: ", e.what()));
  }
  const auto& s = out.state;
  // Integers only: nlohmann converts an out-of-range float to an integer with undefined
  // behaviour, so every integer field is type-checked first.
  auto integer = [&](const nlohmann::json& v, const std::string& what) -> const nlohmann::json& {
    if (!v.is_number_integer()) throw CheckpointError(str(path, ": '", what, "' must be an integer"));
    return v;
  };
  try {
    if (!s.is_object()) throw CheckpointError(str(path, ": trainer state is not an object"));
    const auto& jv = integer(s.at("format_version"), "format_version");
    if (jv.get<int64_t>() != expected_format_version) {
      throw CheckpointError(str(path, ": checkpoint format version ", jv.dump(),
                                ", this build reads ", expected_format_version));
    }
    out.step = integer(s.at("step"), "step").get<int64_t>();
    if (out.step < 0) throw CheckpointError(str(path, ": negative step ", out.step));
    for (const char* k : {"tokens", "data_cursor"}) {
      if (s.contains(k) && integer(s.at(k), k).get<int64_t>() < 0) {
        throw CheckpointError(str(path, ": negative ", k));
      }
    }
    if (s.contains("seed")) integer(s.at("seed"), "seed");
    for (const char* k : {"elapsed_s", "last_val_nelbo"}) {
      if (s.contains(k) && !s.at(k).is_number()) throw CheckpointError(str(path, ": '", k, "' must be a number"));
    }
    if (!s.at("files").is_object()) throw CheckpointError(str(path, ": 'files' is not an object"));
    for (auto it = s.at("files").begin(); it != s.at("files").end(); ++it) {
      const std::string& name = it.key();
      if (name.empty() || name.find("..") != std::string::npos || name.front() == '/') {
        throw CheckpointError(str(path, ": file entry '", name, "' leaves the checkpoint folder"));
      }
      CheckpointFile f;
      const auto& jb = it.value().at("bytes");
      if (!jb.is_number_unsigned()) throw CheckpointError(str(path, ": files.", name, ".bytes must be a non-negative integer"));
      f.bytes = jb.get<uint64_t>();
      f.fnv1a64 = it.value().at("fnv1a64").get<std::string>();
      out.files.emplace(name, f);
    }
    if (!out.files.count("model.safetensors")) {
      throw CheckpointError(str(path, ": lists no model.safetensors"));
    }
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(str(path, ": malformed trainer state: ", e.what()));
  }
  return out;
}

}  // namespace mixdiff

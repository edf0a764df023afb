#include "core/safetensors_header.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/errors.h"

namespace mixdiff {

size_t safetensors_dtype_size(const std::string& d) {
  if (d == "F64" || d == "I64") return 8;
  if (d == "F32" || d == "I32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL") return 1;
  return 0;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* p, size_t size, const std::string& path) {
  if (size < 8) throw CheckpointError(str(path, ": truncated safetensors file (", size, " bytes)"));
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(p[i]) << (8 * i);
  if (n > size - 8) {
    throw CheckpointError(str(path, ": truncated safetensors file (header of ", n,
                              " bytes does not fit in ", size, ")"));
  }
  const uint64_t data_size = size - 8 - n;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(std::string(reinterpret_cast<const char*>(p + 8), n));
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(str(path, ": corrupt safetensors header: ", e.what()));
  }
  if (!header.is_object()) throw CheckpointError(str(path, ": safetensors header is not an object"));
  SafetensorsHeader out;
  out.data_offset = static_cast<size_t>(8 + n);
  uint64_t covered = 0;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it.value().is_object()) {
        for (auto m = it.value().begin(); m != it.value().end(); ++m) {
          if (m.value().is_string()) out.metadata[m.key()] = m.value().get<std::string>();
        }
      }
      continue;
    }
    try {
      const auto& e = it.value();
      SafetensorsEntry t;
      t.dtype = e.at("dtype").get<std::string>();
      const size_t esize = safetensors_dtype_size(t.dtype);
      if (esize == 0) {
        throw CheckpointError(str(path, ": tensor '", it.key(), "' has unsupported dtype ",
                                  e.at("dtype").dump()));
      }
      // Integers only: nlohmann converts a float such as 4e35 to an integer with undefined
      // behaviour (found by fuzzing).
      const auto& js = e.at("shape");
      const auto& jo = e.at("data_offsets");
      if (!js.is_array() || !jo.is_array() ||
          !std::all_of(js.begin(), js.end(), [](const auto& v) { return v.is_number_integer(); }) ||
          !std::all_of(jo.begin(), jo.end(), [](const auto& v) { return v.is_number_unsigned(); })) {
        throw CheckpointError(str(path, ": tensor '", it.key(), "': shape and data_offsets must "
                                  "be lists of non-negative integers"));
      }
      t.shape = js.get<std::vector<int64_t>>();
      auto offs = jo.get<std::vector<uint64_t>>();
      // Bytes the shape needs, with overflow checks: no tensor is larger than the data region.
      bool empty = false;
      for (int64_t s : t.shape) {
        if (s < 0) throw CheckpointError(str(path, ": tensor '", it.key(), "' has a negative dim"));
        empty = empty || s == 0;
      }
      uint64_t numel = empty ? 0 : 1;
      for (int64_t s : t.shape) {
        if (empty) break;
        if (numel > data_size / static_cast<uint64_t>(s)) {
          throw CheckpointError(str(path, ": tensor '", it.key(), "' has a shape larger than ",
                                    "the file's data (file truncated or corrupt)"));
        }
        numel *= static_cast<uint64_t>(s);
      }
      if (numel > data_size / esize) {
        throw CheckpointError(str(path, ": tensor '", it.key(), "' has a shape larger than ",
                                  "the file's data (file truncated or corrupt)"));
      }
      const uint64_t nbytes = numel * esize;
      if (offs.size() != 2 || offs[0] > offs[1] || offs[1] > data_size ||
          offs[1] - offs[0] != nbytes) {
        throw CheckpointError(str(path, ": tensor '", it.key(), "' has data offsets outside the "
                                  "file or of the wrong size (file truncated or corrupt)"));
      }
      t.begin = offs[0];
      t.end = offs[1];
      covered += nbytes;
      out.tensors.emplace(it.key(), std::move(t));
    } catch (const nlohmann::json::exception& ex) {
      throw CheckpointError(str(path, ": malformed entry for tensor '", it.key(), "': ", ex.what()));
    }
  }
  if (covered != data_size) {
    throw CheckpointError(str(path, ": safetensors data region has ", data_size,
                              " bytes but the tensors cover ", covered));
  }
  return out;
}

}  // namespace mixdiff

// The safetensors header, parsed and validated without LibTorch (so that the fuzzer and the
// sanitizer build reach it cheaply): u64 LE length N | N bytes of JSON | data. Every entry's
// dtype, shape (non-negative, no overflow) and data offsets (inside the data region, of the size
// the shape needs, covering the region exactly) are checked; any inconsistency throws
// CheckpointError naming the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mixdiff {

struct SafetensorsEntry {
  std::string dtype;           ///< F32, F64, F16, BF16, I64, I32, I16, I8, U8, BOOL
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0; ///< byte offsets into the data region
};

struct SafetensorsHeader {
  std::map<std::string, SafetensorsEntry> tensors;
  std::map<std::string, std::string> metadata;
  size_t data_offset = 0;  ///< where the data region starts in the file
};

/// Bytes per element of a safetensors dtype name, 0 when unsupported.
size_t safetensors_dtype_size(const std::string& dtype);

/// Parses and validates the header of the `size` bytes at `p` (the whole file).
SafetensorsHeader parse_safetensors_header(const uint8_t* p, size_t size, const std::string& path);

}  // namespace mixdiff

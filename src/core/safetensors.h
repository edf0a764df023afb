// safetensors reader and writer (the format of Hugging Face's `safetensors` package):
//   u64 LE header length N | N bytes of JSON | raw little-endian tensor data
// JSON: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//        "__metadata__": {"key": "value"}}; offsets are relative to the end of the header.
// Tensors are written in name order, contiguous, on the CPU. The reader validates every offset
// and size against the file and throws CheckpointError naming the file on any inconsistency.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace mixdiff {

using TensorMap = std::map<std::string, at::Tensor>;

/// Writes atomically (temporary name, fsync, rename).
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// Reads every tensor (copied out of the file, so the result owns its memory).
TensorMap load_safetensors(const std::string& path,
                           std::map<std::string, std::string>* metadata = nullptr);

}  // namespace mixdiff

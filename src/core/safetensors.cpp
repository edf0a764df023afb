#include "core/safetensors.h"

#include <torch/types.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/compat.h"
#include "core/errors.h"
#include "core/fs.h"
#include "core/safetensors_header.h"

namespace mixdiff {

namespace {

struct DtypeName {
  at::ScalarType type;
  const char* name;
};
constexpr DtypeName kDtypes[] = {
    {at::kFloat, "F32"}, {at::kDouble, "F64"}, {at::kHalf, "F16"},  {at::kBFloat16, "BF16"},
    {at::kLong, "I64"},  {at::kInt, "I32"},    {at::kShort, "I16"}, {at::kChar, "I8"},
    {at::kByte, "U8"},   {at::kBool, "BOOL"},
};

const char* dtype_name(at::ScalarType t) {
  for (const auto& d : kDtypes) {
    if (d.type == t) return d.name;
  }
  throw std::invalid_argument(str("safetensors: unsupported dtype ", t));
}

bool dtype_from_name(const std::string& n, at::ScalarType* out) {
  for (const auto& d : kDtypes) {
    if (n == d.name) {
      *out = d.type;
      return true;
    }
  }
  return false;
}

}  // namespace

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> cpu;
  int64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    const int64_t nbytes = c.numel() * static_cast<int64_t>(c.element_size());
    header[name] = {{"dtype", dtype_name(c.scalar_type())},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    cpu.push_back(c);
  }
  std::string js = header.dump();
  js.append((8 - js.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + js.size() + static_cast<size_t>(offset));
  const uint64_t n = js.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += js;
  for (const auto& c : cpu) {
    out.append(static_cast<const char*>(c.data_ptr()),
               static_cast<size_t>(c.numel()) * c.element_size());
  }
  write_file_atomic(path, out);
}

TensorMap load_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  MappedFile f;
  try {
    f = MappedFile(path);
  } catch (const DataError& e) {
    throw CheckpointError(e.what());
  }
  const SafetensorsHeader h = parse_safetensors_header(f.data(), f.size(), path);
  if (metadata) *metadata = h.metadata;
  const uint8_t* data = f.data() + h.data_offset;
  TensorMap out;
  for (const auto& [name, e] : h.tensors) {
    at::ScalarType type;
    if (!dtype_from_name(e.dtype, &type)) {
      throw CheckpointError(str(path, ": tensor '", name, "' has unsupported dtype ", e.dtype));
    }
    at::Tensor t = torch::empty(e.shape, torch::TensorOptions().dtype(type));
    if (e.end > e.begin) std::memcpy(t.data_ptr(), data + e.begin, e.end - e.begin);
    out.emplace(name, t);
  }
  return out;
}

}  // namespace mixdiff

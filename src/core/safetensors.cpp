#include "core/safetensors.h"

#include <torch/types.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/compat.h"
#include "core/errors.h"
#include "core/fs.h"

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
  const uint8_t* p = f.data();
  if (f.size() < 8) throw CheckpointError(str(path, ": truncated safetensors file (", f.size(), " bytes)"));
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(p[i]) << (8 * i);
  if (n > f.size() - 8) {
    throw CheckpointError(str(path, ": truncated safetensors file (header of ", n,
                              " bytes does not fit in ", f.size(), ")"));
  }
  const uint8_t* data = p + 8 + n;
  const uint64_t data_size = f.size() - 8 - n;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(std::string(reinterpret_cast<const char*>(p + 8), n));
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(str(path, ": corrupt safetensors header: ", e.what()));
  }
  if (!header.is_object()) throw CheckpointError(str(path, ": safetensors header is not an object"));
  TensorMap out;
  uint64_t covered = 0;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (metadata && it.value().is_object()) {
        for (auto m = it.value().begin(); m != it.value().end(); ++m) {
          if (m.value().is_string()) (*metadata)[m.key()] = m.value().get<std::string>();
        }
      }
      continue;
    }
    try {
      const auto& e = it.value();
      at::ScalarType type;
      if (!dtype_from_name(e.at("dtype").get<std::string>(), &type)) {
        throw CheckpointError(str(path, ": tensor '", it.key(), "' has unsupported dtype ",
                                  e.at("dtype").dump()));
      }
      std::vector<int64_t> shape = e.at("shape").get<std::vector<int64_t>>();
      auto offs = e.at("data_offsets").get<std::vector<uint64_t>>();
      int64_t numel = 1;
      for (int64_t s : shape) {
        if (s < 0) throw CheckpointError(str(path, ": tensor '", it.key(), "' has a negative dim"));
        numel *= s;
      }
      const uint64_t nbytes = static_cast<uint64_t>(numel) * c10::elementSize(type);
      if (offs.size() != 2 || offs[0] > offs[1] || offs[1] > data_size ||
          offs[1] - offs[0] != nbytes) {
        throw CheckpointError(str(path, ": tensor '", it.key(), "' has data offsets outside the "
                                  "file or of the wrong size (file truncated or corrupt)"));
      }
      covered += nbytes;
      at::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(type));
      if (nbytes) std::memcpy(t.data_ptr(), data + offs[0], nbytes);
      out.emplace(it.key(), t);
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

#include "fuzz/targets.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "core/config.h"
#include "core/errors.h"
#include "core/safetensors_header.h"
#include "core/trainer_state.h"
#include "data/shards.h"
#include "data/tokenizer.h"

namespace mixdiff::fuzz {

namespace {

namespace fs = std::filesystem;

std::string as_string(const uint8_t* d, size_t n) { return std::string(reinterpret_cast<const char*>(d), n); }

/// A per-process scratch folder for the targets that read files.
const std::string& scratch() {
  static const std::string d = [] {
    const std::string p = (fs::temp_directory_path() / ("mixdiff_fuzz_" + std::to_string(getpid()))).string();
    fs::create_directories(p);
    return p;
  }();
  return d;
}

void write(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// Splits the input at "\n--8<--\n" separators into exactly n parts (missing parts are empty).
std::vector<std::string> split(const uint8_t* d, size_t size, size_t n) {
  const std::string s = as_string(d, size), sep = "\n--8<--\n";
  std::vector<std::string> out;
  size_t start = 0;
  while (out.size() + 1 < n) {
    const size_t p = s.find(sep, start);
    if (p == std::string::npos) break;
    out.push_back(s.substr(start, p - start));
    start = p + sep.size();
  }
  out.push_back(s.substr(std::min(start, s.size())));
  while (out.size() < n) out.emplace_back();
  return out;
}

const char* kBaseRecipe =
    "name: fuzz\nmodel: {kind: dense_dlm, d_model: 32, n_layer: 2, n_head: 2}\n"
    "train: {steps: 10, batch_size: 2}\nlosses: [{kind: masked_diffusion_elbo}]\n"
    "data: {kind: token_shards, path: d, seq_len: 16}\n";

}  // namespace

void recipe(const uint8_t* data, size_t size) {
  ConfigNode c = ConfigNode::from_string(as_string(data, size), "fuzz.yaml");
  const std::string y = c.to_yaml();
  ConfigNode again = ConfigNode::from_string(y, "fuzz-roundtrip.yaml");  // must read back
  (void)again;
  // The canonical form (dataset specs are compared in it) is a fixed point.
  const std::string canon = canonical_yaml(y);
  if (canonical_yaml(canon) != canon) std::abort();
  if (c.is_map() && c.has("train")) {
    ConfigNode t = c.at("train");
    if (t.has("steps")) (void)t.get<int64_t>("steps");
  }
}

void override_set(const uint8_t* data, size_t size) {
  ConfigNode c = ConfigNode::from_string(kBaseRecipe, "base.yaml");
  c.apply_override(as_string(data, size));
  (void)ConfigNode::from_string(c.to_yaml(), "fuzz-roundtrip.yaml");
}

void safetensors(const uint8_t* data, size_t size) {
  const SafetensorsHeader h = parse_safetensors_header(data, size, "fuzz.safetensors");
  for (const auto& [name, e] : h.tensors) {
    // What load_safetensors then copies must lie inside the input.
    if (h.data_offset + e.end > size || e.begin > e.end) std::abort();
  }
}

void shard_header(const uint8_t* data, size_t size) {
  const std::string p = scratch() + "/shard.bin";
  write(p, as_string(data, size));
  ShardReader r(p, /*check_tokens=*/true);
  if (r.size() > 0) {
    std::vector<int64_t> out(static_cast<size_t>(std::min<int64_t>(r.size(), 64)));
    r.copy_to(0, static_cast<int64_t>(out.size()), out.data());
    (void)r.at(r.size() - 1);
  }
}

void tokenizer(const uint8_t* data, size_t size) {
  const auto parts = split(data, size, 3);
  const std::string d = scratch() + "/tok";
  fs::create_directories(d);
  write(d + "/tokenizer.json", parts[0]);
  write(d + "/encoder.json", parts[1]);
  write(d + "/vocab.bpe", parts[2]);
  Tokenizer t = Tokenizer::load(d);
  const std::string text = "The cat sat\n\xc3\xa9 \xff!";
  const auto ids = t.encode(text);
  for (int32_t id : ids) {
    if (id < 0 || id >= t.vocab_size()) std::abort();
  }
  (void)t.decode(ids);
}

void trainer_state(const uint8_t* data, size_t size) {
  (void)parse_trainer_state(as_string(data, size), "trainer_state.json", 1);
}

const std::vector<Target>& targets() {
  static const std::vector<Target> t = {
      {"recipe", recipe},           {"override", override_set}, {"safetensors", safetensors},
      {"shard_header", shard_header}, {"tokenizer", tokenizer}, {"trainer_state", trainer_state},
  };
  return t;
}

bool run_one(const std::string& name, const uint8_t* data, size_t size, std::string* what) {
  for (const auto& t : targets()) {
    if (name != t.name) continue;
    try {
      t.run(data, size);
    } catch (const InputError&) {
      // refused with a clear error: fine
    } catch (const std::exception& e) {
      if (what) *what = e.what();
      return false;
    }
    return true;
  }
  if (what) *what = "no fuzz target named " + name;
  return false;
}

}  // namespace mixdiff::fuzz

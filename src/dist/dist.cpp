#include "dist/dist.h"

#include <torch/torch.h>

#include <chrono>
#include <cstdlib>
#include <limits>

#include "core/compat.h"
#include "core/errors.h"

namespace mixdiff {

namespace {

/// Integer environment variable, or `def` when unset.
int env_int(const char* name, int def, int lo) {
  const char* v = std::getenv(name);
  if (!v || !*v) return def;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < lo || x > std::numeric_limits<int>::max()) {
    throw ConfigError(str("environment variable ", name, "='", v, "': expected an integer >= ", lo));
  }
  return static_cast<int>(x);
}

}  // namespace

void sum_gradients(compat::Collectives& group, const std::vector<at::Tensor>& params,
                   int64_t bucket_bytes, double scale) {
  torch::NoGradGuard ng;
  size_t i = 0;
  while (i < params.size()) {
    // One bucket: consecutive parameters of one dtype up to bucket_bytes (at least one).
    std::vector<at::Tensor> grads;
    int64_t bytes = 0;
    const auto dtype = params[i].scalar_type();
    while (i < params.size() && params[i].scalar_type() == dtype &&
           (grads.empty() || bytes + params[i].nbytes() <= static_cast<size_t>(bucket_bytes))) {
      auto& p = const_cast<at::Tensor&>(params[i]);
      if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
      grads.push_back(p.grad());
      bytes += static_cast<int64_t>(p.nbytes());
      ++i;
    }
    std::vector<at::Tensor> flat{torch::cat([&] {
      std::vector<at::Tensor> f;
      for (auto& g : grads) f.push_back(g.reshape({-1}));
      return f;
    }())};
    group.all_reduce_sum(flat);
    flat[0].mul_(scale);
    int64_t off = 0;
    for (auto& g : grads) {
      g.copy_(flat[0].narrow(0, off, g.numel()).view_as(g));
      off += g.numel();
    }
  }
}

DistEnv DistEnv::from_env() {
  DistEnv e;
  e.world = env_int("WORLD_SIZE", 1, 1);
  e.rank = env_int("RANK", 0, 0);
  e.local_rank = env_int("LOCAL_RANK", e.rank, 0);
  e.local_world = env_int("LOCAL_WORLD_SIZE", e.world, 1);
  e.master_port = env_int("MASTER_PORT", 29500, 1);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  if (e.rank >= e.world) {
    throw ConfigError(str("environment variable RANK=", e.rank, ": expected below WORLD_SIZE=",
                          e.world));
  }
  if (e.master_port > 65535) {
    throw ConfigError(str("environment variable MASTER_PORT=", e.master_port,
                          ": expected a port number 1..65535"));
  }
  return e;
}

DataParallel::DataParallel(const DistEnv& env, double timeout_s, const at::Device& device)
    : env_(env), comm_device_(device.is_cuda() ? device : at::Device(at::kCPU)) {
  if (env_.world <= 1) return;
  compat::ProcessGroupSpec s;
  s.backend = device.is_cuda() ? "nccl" : "gloo";
  s.master_addr = env_.master_addr;
  s.master_port = env_.master_port;
  s.rank = env_.rank;
  s.world = env_.world;
  s.timeout_s = timeout_s;
  try {
    pg_ = compat::make_process_group(s);
  } catch (const std::runtime_error& e) {
    throw InputError(e.what());
  }
}

DataParallel::~DataParallel() = default;

void DataParallel::all_reduce_sum(at::Tensor& t) {
  if (!pg_) return;
  std::vector<at::Tensor> v{t.device() == comm_device_ ? t : t.to(comm_device_)};
  pg_->all_reduce_sum(v);
  if (!v[0].is_same(t)) t.copy_(v[0]);
}

void DataParallel::all_reduce_max(at::Tensor& t) {
  if (!pg_) return;
  std::vector<at::Tensor> v{t.device() == comm_device_ ? t : t.to(comm_device_)};
  pg_->all_reduce_max(v);
  if (!v[0].is_same(t)) t.copy_(v[0]);
}

void DataParallel::broadcast_state(torch::nn::Module& m) {
  if (!pg_) return;
  torch::NoGradGuard ng;
  std::vector<at::Tensor> all;
  for (auto& p : m.parameters(/*recurse=*/true)) all.push_back(p);
  for (auto& b : m.buffers(/*recurse=*/true)) all.push_back(b);
  for (auto& t : all) {
    std::vector<at::Tensor> v{t};
    pg_->broadcast(v, 0);
  }
}

void DataParallel::average_gradients(const std::vector<at::Tensor>& params, int64_t bucket_bytes) {
  if (!pg_) return;
  const auto t0 = std::chrono::steady_clock::now();
  sum_gradients(*pg_, params, bucket_bytes, 1.0 / static_cast<double>(env_.world));
  comm_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool DataParallel::replicas_identical(const torch::nn::Module& m) {
  if (!pg_) return true;
  // FNV-1a over the bytes of every parameter and buffer, split into two exact 32-bit halves.
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&](const at::Tensor& t) {
    auto c = t.detach().to(torch::kCPU).contiguous();
    const auto* p = static_cast<const unsigned char*>(c.data_ptr());
    for (size_t k = 0; k < c.nbytes(); ++k) {
      h ^= p[k];
      h *= 1099511628211ULL;
    }
  };
  for (const auto& p : m.parameters(true)) mix(p);
  for (const auto& b : m.buffers(true)) mix(b);
  auto mine = torch::tensor({static_cast<double>(h >> 32), static_cast<double>(h & 0xffffffffULL)},
                            torch::kFloat64);
  auto hi = mine.clone(), lo = -mine;
  all_reduce_max(hi);
  all_reduce_max(lo);
  return torch::equal(hi, -lo);
}

void DataParallel::barrier() {
  if (pg_) pg_->barrier();
}

std::unique_ptr<compat::Collectives> DataParallel::subgroup(const std::vector<int>& members,
                                                           const std::string& name) {
  if (!pg_) return nullptr;
  return pg_->subgroup(members, name);
}

double DataParallel::take_comm_seconds() {
  const double s = comm_s_;
  comm_s_ = 0;
  return s;
}

}  // namespace mixdiff

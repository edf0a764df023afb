#include "train/memory_plan.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unordered_set>

#include "core/compat.h"
#include "core/errors.h"
#include "moe/block_routing.h"
#include "moe/moe_layer.h"
#include "train/trainer.h"

namespace mixdiff {

namespace {

// ---- a counting CPU allocator: live and peak bytes of the tensors allocated while installed ----

class CountingAllocator final : public c10::Allocator {
 public:
#if MIXDIFF_TORCH_AT_LEAST(2, 3)
  c10::DataPtr allocate(size_t n) override { return make(n); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }
#else
  c10::DataPtr allocate(size_t n) const override { return make(n); }
#endif
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  c10::Allocator* inner = nullptr;
  mutable std::atomic<int64_t> live{0}, peak{0};

 private:
  struct Held {
    c10::DataPtr data;
    int64_t bytes;
    const CountingAllocator* owner;
  };
  static void release(void* p) {
    auto* h = static_cast<Held*>(p);
    h->owner->live -= h->bytes;
    delete h;
  }
  c10::DataPtr make(size_t n) const {
    auto* h = new Held{inner->allocate(n), static_cast<int64_t>(n), this};
    const int64_t now = live += static_cast<int64_t>(n);
    int64_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
    void* ptr = h->data.get();
    return {ptr, h, &CountingAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }
};

// Never destroyed: tensors allocated through it may outlive the probe.
CountingAllocator& counter() {
  static auto* c = new CountingAllocator();
  return *c;
}

/// Installs the counting allocator for its lifetime (the default one again afterwards).
class Counting {
 public:
  Counting() {
    auto& c = counter();
    previous_ = c10::GetCPUAllocator();
    c.inner = previous_;
    c10::SetCPUAllocator(&c, /*priority=*/255);
  }
  ~Counting() { c10::SetCPUAllocator(previous_, /*priority=*/255); }
  Counting(const Counting&) = delete;
  Counting& operator=(const Counting&) = delete;

 private:
  c10::Allocator* previous_ = nullptr;
};

double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) * 1024.0;
}

double rss_bytes() {
  std::ifstream f("/proc/self/statm");
  long pages_total = 0, pages_rss = 0;
  if (!(f >> pages_total >> pages_rss)) return 0;
  return static_cast<double>(pages_rss) * static_cast<double>(sysconf(_SC_PAGESIZE));
}

struct Probe {
  std::vector<double> block;  ///< bytes kept by each block after the forward
  double peak = 0;            ///< peak above the start, over forward and backward
};

// Forward and backward of `micro` micro-batches of `b` sequences in eval mode with grad (no
// routing state changes), under the counting allocator.
Probe probe(TrainerParts& p, int64_t b, int64_t micro) {
  auto& model = *p.model;
  const auto& o = p.options;
  Probe r;
  std::vector<double> marks;
  {
    Counting counting;
    auto& c = counter();
    const int64_t base = c.live.load();
    c.peak = base;

    struct HookGuard {
      ModelBase& m;
      ~HookGuard() { m.set_block_hook({}); }
    } hook_guard{model};
    model.set_block_hook([&](int64_t) { marks.push_back(static_cast<double>(c.live.load() - base)); });
    for (int64_t m = 0; m < micro; ++m) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(17 + m));
      auto x0 = p.data->train_batch(m * b, b);
      DiffusionBatch batch = o.objective->noise(x0, *p.schedule, model.mask_id(), gen, 1, 0,
                                                p.data->train_response(m * b, b));
      ModelInput in = o.objective->input(batch, x0);
      marks.clear();
      ModelOutput out = model.forward(in);
      at::Tensor total;
      for (auto& l : p.losses) {
        if (l.routing) continue;
        auto v = l.term->compute(out, batch) * l.weight;
        total = total.defined() ? total + v : v;
      }
      if (m == 0) {
        for (size_t i = 1; i < marks.size(); ++i) r.block.push_back(marks[i] - marks[i - 1]);
      }
      (total / static_cast<double>(micro)).backward();
    }
    r.peak = static_cast<double>(c.peak.load() - base);

    model.set_block_hook({});
    for (auto& w : model.parameters()) w.mutable_grad() = at::Tensor();
  }
  return r;
}

// v at batch B from its values at 1 and 2.
double at_batch(double v1, double v2, int64_t B) {
  return std::max(0.0, v1 + (v2 - v1) * static_cast<double>(B - 1));  // exact for affine v
}

std::string mib(double bytes) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.1f", bytes / (1024.0 * 1024.0));
  return b;
}

}  // namespace

double host_available_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  double kb = 0;
  while (f >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024.0;
  }
  return 0;
}

MemoryPlan plan_memory(TrainerParts& parts, int world, bool compare) {
  auto& model = *parts.model;
  const auto& o = parts.options;
  MemoryPlan plan;
  plan.device = parts.device.str();
  plan.world = world;
  plan.expert_parallel = o.expert_parallel;
  plan.shard_optimizer = o.shard_optimizer && world > 1;
  plan.checkpointing = o.activation_checkpointing.name();
  plan.checkpointing_every = o.activation_checkpointing.every;
  plan.batch = o.batch_size;
  plan.seq_len = parts.data->seq_len();
  plan.grad_accum = o.grad_accum;

  // States, from the parameter shapes: routed experts are the pools' tensors.
  std::unordered_set<const void*> expert;
  for (MoeLayer* l : model.moe_layers()) {
    for (const auto& t : l->pool().parameters()) expert.insert(t.unsafeGetTensorImpl());
  }
  double replicated = 0, experts = 0, trained = 0, tensors = 0, buffers = 0;
  for (const auto& t : model.buffers()) buffers += static_cast<double>(t.nbytes());
  for (const auto& t : model.parameters()) {
    const double b = static_cast<double>(t.nbytes());
    tensors += b;
    (expert.count(t.unsafeGetTensorImpl()) ? experts : replicated) += b;
    if (t.requires_grad()) trained += b;
  }
  tensors += buffers;
  const double ep = static_cast<double>(std::max<int64_t>(1, o.expert_parallel));
  const double local_experts = experts / ep;
  plan.params = replicated + local_experts + buffers;
  plan.grads = trained * (replicated + local_experts) / std::max(1.0, replicated + experts);
  const double W = static_cast<double>(world);
  const double replica_group = W / ep;  // ranks that hold the same expert shard
  if (plan.shard_optimizer) {
    plan.optimizer = 2.0 * (replicated / W + local_experts / (replica_group > 1 ? replica_group : 1));
  } else {
    plan.optimizer = 2.0 * (replicated + local_experts);
  }
  const double bucket = static_cast<double>(o.bucket_bytes);
  if (world > 1) {
    if (plan.shard_optimizer) {
      // The receive bucket of the reduce-scatter and the rank's gradient pieces, kept until the
      // optimizer step.
      plan.comm = std::min(bucket, plan.grads) + plan.optimizer / 2.0;
    } else {
      plan.comm = std::min(bucket, plan.grads);
    }
    if (o.expert_parallel > 1 && !model.moe_layers().empty()) {
      double k = 0;
      for (MoeLayer* l : model.moe_layers()) k = std::max(k, static_cast<double>(l->router().top_k()));
      plan.comm += 2.0 * static_cast<double>(o.batch_size * plan.seq_len) * k *
                   static_cast<double>(model.moe_layers().front()->options().d_model) * 4.0;
    }
  }
  // What the probe process holds that a rank does not (the other ranks' experts, and their
  // gradients): taken off its measured footprint.
  const double not_this_rank = (tensors - plan.params) + (trained - plan.grads);
  plan.runtime = plan.runtime_none = std::max(0.0, rss_bytes() - tensors);

  if (parts.device.is_cpu()) {
    const ActivationCheckpointing recipe_ac = o.activation_checkpointing;
    // Whatever happens in the probe, the model leaves it as it came: training mode, the recipe's
    // checkpointing, block-routing policies without the probe's coresets.
    struct Restore {
      ModelBase& m;
      bool training;
      ActivationCheckpointing ac;
      ~Restore() {
        m.set_activation_checkpointing(ac);
        for (MoeLayer* l : m.moe_layers()) {
          if (l->block_routing()) l->block_routing()->reset();
        }
        if (training) m.train();
      }
    } restore{model, model.is_training(), recipe_ac};
    model.eval();
    const int64_t micro = o.grad_accum > 1 ? 2 : 1;
    const double avail = host_available_bytes();
    // One configuration: the blocks' kept bytes, the step's peak, and the runtime as the process's
    // peak RSS after the probe (LibTorch, BLAS buffers, the allocator's slack) less its tensors.
    auto run = [&](const ActivationCheckpointing& ac, std::vector<double>& block, double& step,
                   double& runtime, bool recipes) {
      model.set_activation_checkpointing(ac);
      // What each block keeps is proportional to the sequences: exact from 1 and 2.
      const Probe one = probe(parts, 1, 1), two = probe(parts, 2, 1);
      block.clear();
      double kept = 0;
      for (size_t i = 0; i < one.block.size() && i < two.block.size(); ++i) {
        block.push_back(at_batch(one.block[i], two.block[i], o.batch_size));
        kept += block.back();
      }
      // The step's peak is not linear (where it falls in the backward moves with the batch): it
      // is measured on the micro-batch itself, unless the host cannot hold even the states and
      // the kept activations.
      const double floor = runtime + plan.params + plan.optimizer + plan.comm + kept;
      if (avail > 0 && floor > avail) {
        step = kept + plan.grads;
        if (recipes) plan.lower_bound = true;
        return;
      }
      const Probe full = probe(parts, o.batch_size, micro);
      // The probe's gradients are the whole model's; the rank's are its own.
      step = full.peak - trained + plan.grads;
      runtime = std::max(0.0, peak_rss_bytes() - not_this_rank - plan.params - step);
    };
    // The recipe's configuration first: the process's peak RSS only grows, and the
    // configuration without checkpointing holds more.
    if (recipe_ac.mode != ActivationCheckpointing::Mode::kNone) {
      run(recipe_ac, plan.block_ckpt, plan.step, plan.runtime, true);
      plan.runtime_none = plan.runtime;
      if (compare) {
        run(ActivationCheckpointing{}, plan.block, plan.step_none, plan.runtime_none, false);
      }
    } else {
      run(recipe_ac, plan.block, plan.step, plan.runtime, true);
      plan.block_ckpt = plan.block;
      plan.step_none = plan.step;
      plan.runtime_none = plan.runtime;
    }
    plan.compared = compare || recipe_ac.mode == ActivationCheckpointing::Mode::kNone;
    plan.probed = true;
  } else {
    // Device memory only: the host's RSS is not on the device, and activations are not probed.
    plan.runtime = plan.runtime_none = 0;
    plan.step = plan.step_none = plan.grads;
  }
  return plan;
}

std::string MemoryPlan::summary() const {
  return str("memory plan per rank: ", lower_bound ? "at least " : "", mib(total()), " MiB (runtime ", mib(runtime),
             ", parameters ", mib(params), ", AdamW ", mib(optimizer), ", comm ", mib(comm),
             ", step peak ", probed ? mib(step) : "not probed on " + device,
             probed ? str(" with ", mib(grads), " of gradients") : "", "; activation checkpointing ",
             checkpointing, probed && compared && checkpointing != "none"
                                ? str(": ", mib(total_none()), " MiB without")
                                : "",
             ")");
}

std::string MemoryPlan::table() const {
  std::ostringstream s;
  s << "memory plan per rank: " << world << " rank(s), expert_parallel " << expert_parallel
    << ", shard_optimizer " << (shard_optimizer ? "true" : "false") << ", micro-batch " << batch
    << " x " << seq_len << ", grad_accum " << grad_accum << ", activation checkpointing "
    << checkpointing << ", device " << device << "\n";
  auto row = [&](const std::string& what, double b, const std::string& note = "") {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "  %-34s %10s MiB", what.c_str(), mib(b).c_str());
    s << buf << (note.empty() ? "" : "  " + note) << "\n";
  };
  row("runtime (process, BLAS, allocator)", runtime,
      probed ? "measured: peak RSS of the probe less its tensors" : "not counted: device memory only");
  row("parameters and buffers", params);
  row("gradients", grads, "(inside the step peak)");
  row("optimizer state (AdamW moments)", optimizer);
  row("communication buffers", comm);
  if (probed) {
    s << "  activations kept by block (MiB), without -> with checkpointing:\n";
    for (size_t i = 0; i < block_ckpt.size(); ++i) {
      s << "    block " << i << ": " << (i < block.size() ? mib(block[i]) : std::string("-"))
        << " -> " << mib(block_ckpt[i]) << "\n";
    }
    double a = 0, b = 0;
    for (double v : block) a += v;
    for (double v : block_ckpt) b += v;
    if (compared) row("activations, all blocks", a, "without checkpointing");
    row("activations, all blocks (" + checkpointing + ")", b);
    if (compared) row("step peak without checkpointing", step_none);
    row("step peak (" + checkpointing + ")", step);
  } else {
    s << "  activations: not probed (the probe counts CPU allocations; device " << device << ")\n";
  }
  if (lower_bound) {
    s << "  (the step peak is a lower bound: the states and the kept activations exceed this "
         "host's available memory, so the micro-batch was not probed whole)\n";
  }
  row("total", total());
  if (probed && compared && checkpointing != "none") {
    row("total without checkpointing", total_none());
  }
  return s.str();
}

nlohmann::json MemoryPlan::to_json() const {
  return {{"device", device},        {"world", world},
          {"expert_parallel", expert_parallel}, {"shard_optimizer", shard_optimizer},
          {"activation_checkpointing", checkpointing},
          {"activation_checkpointing_every", checkpointing_every}, {"batch", batch},
          {"seq_len", seq_len},      {"grad_accum", grad_accum},
          {"probed", probed},        {"lower_bound", lower_bound},
          {"compared", compared},    {"runtime_bytes_without_checkpointing", runtime_none},        {"runtime_bytes", runtime},
          {"parameter_bytes", params}, {"gradient_bytes", grads},
          {"optimizer_bytes", optimizer}, {"comm_bytes", comm},
          {"block_activation_bytes", block}, {"block_activation_bytes_checkpointed", block_ckpt},
          {"step_peak_bytes", step}, {"step_peak_bytes_without_checkpointing", step_none},
          {"total_bytes", total()},  {"total_bytes_without_checkpointing", total_none()}};
}

}  // namespace mixdiff

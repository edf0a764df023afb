#include "moe/slot_map.h"

#include <torch/torch.h>

#include <utility>

namespace mixdiff {

SlotMap::SlotMap(std::shared_ptr<ExpertPool> pool, at::Tensor candidates_S, int64_t pool_users)
    : pool_(std::move(pool)), candidates_S_(std::move(candidates_S)), pool_users_(pool_users) {
  TORCH_CHECK(pool_, "[SlotMap] a map into a shared pool needs the pool");
  TORCH_CHECK(!candidates_S_.defined() || candidates_S_.dim() == 1,
              "[SlotMap] candidates must be int64 [S]");
  TORCH_CHECK(pool_users_ >= 1, "[SlotMap] a pool has at least one user, got ", pool_users_);
}

at::Tensor SlotMap::visible(int64_t /*step*/, bool /*training*/, const c10::Device& /*device*/) {
  return {};
}

at::Tensor SlotMap::pool_experts(const at::Tensor& slot_A) {
  if (!candidates_S_.defined()) return slot_A;
  return on(candidates_S_, slot_A.device()).index_select(0, slot_A);
}

const at::Tensor& SlotMap::on(at::Tensor& t, const c10::Device& device) {
  if (t.defined() && t.device() != device) t = t.to(device);
  return t;
}

}  // namespace mixdiff

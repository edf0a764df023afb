#include "core/errors.h"
#include "infer/sampler.h"

namespace mixdiff {

SamplerRegistry& samplers_registry() {
  static SamplerRegistry r("samplers", "diffusion samplers (generate.sampler.kind)");
  return r;
}

GenerateSettings GenerateSettings::from(const ConfigNode& recipe) {
  GenerateSettings g;
  ConfigNode c = recipe.section("generate");
  g.prompt = c.get<std::string>("prompt", "");
  g.seed = c.get<int64_t>("seed", 0);
  g.num_samples = c.get<int64_t>("num_samples", 1);
  if (g.num_samples <= 0) c.fail("num_samples", "expected a positive integer");
  ConfigNode s = c.section("sampler");
  g.sampler = samplers_registry().create(s.get<std::string>("kind", "llada"), s.path() + ".kind", s);
  return g;
}

}  // namespace mixdiff

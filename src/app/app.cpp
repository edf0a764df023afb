#include "app/app.h"
#include "train/memory_plan.h"

#include <malloc.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>

#include "core/compat.h"
#include "core/errors.h"
#include "core/fs.h"
#include "core/json_util.h"
#include "core/safetensors.h"
#include "dist/dist.h"
#include "dist/expert_parallel.h"
#include "data/prepare.h"
#include "data/sft.h"
#include "eval/likelihood.h"
#include "eval/tasks.h"
#include "data/tokenizer.h"
#include "infer/sampler.h"
#include "moe/capacity.h"
#include "moe/dispatcher.h"
#include "moe/routing_loss.h"
#include "loss/loss.h"
#include "loss/objective.h"
#include "moe/router.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace mixdiff {

namespace fs = std::filesystem;

namespace {

ConfigNode load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  ConfigNode r = ConfigNode::from_file(path);
  for (const auto& o : overrides) r.apply_override(o);
  return r;
}

void set_threads(const ConfigNode& recipe) {
  const int64_t threads = recipe.section("runtime").get<int64_t>("threads", 1);
  if (threads <= 0) recipe.at("runtime").fail("threads", "expected a positive integer");
  torch::set_num_threads(static_cast<int>(threads));
}

// Model of a checkpoint, rebuilt from the checkpoint's own recipe, with its weights.
std::shared_ptr<ModelBase> load_checkpoint_model(const std::string& ckpt, const ConfigNode& recipe) {
  set_threads(recipe);
  auto model = build_model(recipe.at("model"));
  load_model_weights(*model, ckpt + "/model.safetensors");
  ConfigNode rt = recipe.section("runtime");
  const at::Device device = parse_device(rt);
  parse_dtype(rt, device);
  model->to(device);
  model->eval();
  return model;
}

std::string text_until_eos(const Tokenizer& tok, const at::Tensor& ids_L) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < ids_L.size(0); ++i) {
    const auto id = static_cast<int32_t>(ids_L[i].item<int64_t>());
    if (id == tok.eos_id()) break;
    ids.push_back(id);
  }
  return tok.decode(ids);
}

}  // namespace

int cmd_train(const TrainArgs& a) {
  std::string ckpt;
  if (!a.resume.empty()) {
    ckpt = resolve_checkpoint(a.resume);
    verify_checkpoint(ckpt);
  }
  if (a.recipe.empty() && ckpt.empty()) {
    throw ConfigError("train: expected a RECIPE file or --resume RUN_OR_CHECKPOINT");
  }
  ConfigNode recipe = load_recipe(a.recipe.empty() ? ckpt + "/recipe.yaml" : a.recipe, a.overrides);
  TrainerParts parts = build_trainer_parts(recipe);
  const std::string name = parts.name;
  GenerateSettings::from(recipe);  // validated now so a bad sampler fails before training
  const TaskSettings tasks = TaskSettings::from_recipe(recipe);
  recipe.check_unknown_keys();
  const std::string resolved = recipe.to_yaml();

  std::string run_dir = a.out;
  if (run_dir.empty()) {
    run_dir = ckpt.empty() ? "runs/" + name : fs::path(ckpt).parent_path().parent_path().string();
  }
  if (ckpt.empty() && fs::exists(run_dir + "/checkpoints")) {
    throw ConfigError(str("run folder '", run_dir, "' already holds checkpoints; continue it with "
                          "--resume ", run_dir, ", or choose another folder with --out"));
  }
  // Under a launcher (torchrun's variables), rank 0 owns the run folder; every rank reads.
  const DistEnv env = DistEnv::from_env();
  // Checked before rendezvous: dist.expert_parallel must divide the world size.
  ParallelLayout(env.world, static_cast<int>(parts.options.expert_parallel), env.rank);
  if (env.rank == 0) {
    fs::create_directories(run_dir);
    if (ckpt.empty()) {
      for (const char* f : {"metrics.jsonl", "train.log"}) fs::remove(run_dir + "/" + f);
    }
    write_file_atomic(run_dir + "/recipe.yaml", resolved);
  }
  install_stop_handlers();
  if (env.world > 1) {
    parts.dp = std::make_shared<DataParallel>(env, parts.options.dist_timeout_s, parts.device);
  }
  if (env.rank == 0) {
    // Before the first step: what each rank will hold, and whether this host has it.
    const MemoryPlan plan = plan_memory(parts, env.world, /*compare=*/false);
    std::cout << plan.summary() << std::endl;
    write_file_atomic(run_dir + "/memory_plan.json", plan.to_json().dump(2) + "\n");
    const double avail = host_available_bytes();
    const double local = static_cast<double>(std::max(1, env.local_world)) * plan.total();
    if (parts.device.is_cpu() && avail > 0 && local > avail) {
      std::cerr << "warning: the memory plan (" << static_cast<int64_t>(local / (1 << 20))
                << " MiB for " << std::max(1, env.local_world)
                << " rank(s) on this host) exceeds the memory available ("
                << static_cast<int64_t>(avail / (1 << 20)) << " MiB)" << std::endl;
    }
  }
  Trainer trainer(std::move(parts), run_dir, resolved);
  if (!ckpt.empty()) {
    trainer.restore(ckpt);
    if (env.rank == 0) {
      std::cout << "resumed from " << ckpt << " at step " << trainer.state().step << std::endl;
    }
  } else {
    trainer.initialize_from_checkpoint();
  }
  const int rc = trainer.fit();
  if (rc != 0 || env.rank != 0 || tasks.run.empty()) return rc;
  // tasks.run: the named tasks on the final checkpoint, into RUN/eval_tasks.json (a sweep's
  // tables and report show their accuracies).
  EvalArgs ea;
  ea.ckpt = run_dir;
  ea.tasks = tasks.run;
  return cmd_eval(ea);
}

int cmd_generate(const GenerateArgs& a) {
  install_stop_handlers();
  enable_interrupt_exceptions();
  const std::string ckpt = resolve_checkpoint(a.ckpt);
  verify_checkpoint(ckpt);
  ConfigNode recipe = load_recipe(ckpt + "/recipe.yaml", a.overrides);
  auto model = load_checkpoint_model(ckpt, recipe);
  GenerateSettings g = GenerateSettings::from(recipe);
  if (recipe.has("infer")) {  // inference-time block routing
    auto b = BlockRoutingConfig::from(recipe.at("infer").section("block_routing"));
    model->set_block_routing(b.policy->restricts() ? b.policy : nullptr, b.block_size);
    recipe.at("infer").check_unknown_keys();
  }
  recipe.at("model").check_unknown_keys();
  recipe.at("generate").check_unknown_keys();
  recipe.check_overrides_used();
  Tokenizer tok = Tokenizer::load(ckpt + "/tokenizer");
  if (tok.vocab_size() != model->vocab_size()) {
    throw CheckpointError(str(ckpt, "/tokenizer: ", tok.vocab_size(), " tokens, the model has ",
                              model->vocab_size()));
  }
  std::vector<std::string> prompts = a.prompts.empty() ? std::vector<std::string>{g.prompt}
                                                       : a.prompts;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(g.seed));
  g.sampler->set_eos(tok.eos_id());
  if (g.sampler->supports_padding() && prompts.size() > 1) {
    // One left-padded batch of every prompt (x num_samples).
    std::vector<std::vector<int32_t>> enc;
    for (const auto& p : prompts) enc.push_back(tok.encode(p));
    const auto [x, valid] = left_pad(enc, tok.eos_id(), g.num_samples);
    const int64_t B = x.size(0);
    const size_t P = static_cast<size_t>(x.size(1));
    const auto t0 = std::chrono::steady_clock::now();
    SampleResult res = g.sampler->generate_padded(*model, x.to(module_device(*model)),
                                                  valid.to(module_device(*model)), gen);
    res.tokens_BL = res.tokens_BL.to(torch::kCPU);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int64_t r = 0; r < B; ++r) {
      const auto& prompt = prompts[static_cast<size_t>(r / g.num_samples)];
      auto gen_ids = res.tokens_BL[r].narrow(0, static_cast<int64_t>(P), g.sampler->gen_length());
      std::cout << "prompt: " << prompt << "\n"
                << "sample: " << prompt << text_until_eos(tok, gen_ids) << "\n";
    }
    const double toks = static_cast<double>(B * g.sampler->gen_length());
    std::cout << std::fixed << std::setprecision(2) << "generated " << B << " x "
              << g.sampler->gen_length() << " tokens in " << secs << " s (" << toks / secs
              << " tokens/s, " << res.forwards << " forwards, "
              << toks / static_cast<double>(std::max<int64_t>(1, res.forwards))
              << " tokens per forward)" << std::endl;
    return 0;
  }
  for (const auto& prompt : prompts) {
    std::vector<int32_t> ids = tok.encode(prompt);
    auto p = torch::empty({g.num_samples, static_cast<int64_t>(ids.size())}, torch::kLong);
    for (int64_t r = 0; r < g.num_samples; ++r) {
      for (size_t i = 0; i < ids.size(); ++i) p[r][static_cast<int64_t>(i)] = ids[i];
    }
    const auto t0 = std::chrono::steady_clock::now();
    SampleResult res = g.sampler->generate(*model, p.to(module_device(*model)), gen);
    res.tokens_BL = res.tokens_BL.to(torch::kCPU);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int64_t r = 0; r < g.num_samples; ++r) {
      auto gen_ids = res.tokens_BL[r].narrow(0, static_cast<int64_t>(ids.size()),
                                             g.sampler->gen_length());
      std::cout << "prompt: " << prompt << "\n"
                << "sample: " << prompt << text_until_eos(tok, gen_ids) << "\n";
    }
    const double toks = static_cast<double>(g.num_samples * g.sampler->gen_length());
    std::cout << std::fixed << std::setprecision(2) << "generated " << g.num_samples << " x "
              << g.sampler->gen_length() << " tokens in " << secs << " s (" << toks / secs
              << " tokens/s, " << res.forwards << " forwards, "
              << toks / static_cast<double>(std::max<int64_t>(1, res.forwards))
              << " tokens per forward)" << std::endl;
  }
  return 0;
}

namespace {

// lm-eval's requests (tools/lm_eval_mixdiff.py), one JSON object per line:
//   {"request_type": "loglikelihood", "context": "...", "continuation": "..."}
//   {"request_type": "loglikelihood_rolling", "context": "...", "continuation": ""}: the whole
//       text scored as a continuation of nothing (it must fit model.max_seq_len)
//   {"request_type": "generate_until", "context": "...", "until": ["\n"], "max_gen_toks": 32}
// Answers, in order: {"loglikelihood": x, "is_greedy": b, "se": s} or {"text": "..."}.
void answer_requests(ModelBase& model, const Tokenizer& tok, const TaskSettings& ts,
                     const std::string& in_path, const std::string& out_path) {
  std::vector<nlohmann::json> reqs;
  for_each_json_line(read_file(in_path, "requests file"), "requests file " + in_path,
                     [&](const nlohmann::json& j, int64_t n) {
    const std::string type = j.value("request_type", "");
    if (type != "loglikelihood" && type != "loglikelihood_rolling" && type != "generate_until") {
      throw InputError(str("requests file ", in_path, " line ", n, ": request_type '", type,
                           "' (expected loglikelihood, loglikelihood_rolling or generate_until)"));
    }
    if (!j.contains("context") || !j["context"].is_string()) {
      throw InputError(str("requests file ", in_path, " line ", n, ": expected a string context"));
    }
    reqs.push_back(j);
  });
  std::vector<nlohmann::json> answers(reqs.size());
  std::vector<LoglikRequest> ll;
  std::vector<size_t> ll_at;
  std::map<int64_t, std::vector<size_t>> gen_by_len;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& j = reqs[i];
    const std::string type = j["request_type"];
    if (type == "generate_until") {
      gen_by_len[j.value("max_gen_toks", int64_t{32})].push_back(i);
    } else if (type == "loglikelihood_rolling") {
      ll.push_back(encode_pair(tok, "", j["context"].get<std::string>(), model.max_seq_len()));
      ll_at.push_back(i);
    } else {
      ll.push_back(encode_pair(tok, j["context"].get<std::string>(),
                               j.value("continuation", std::string()), model.max_seq_len()));
      ll_at.push_back(i);
    }
  }
  LoglikOptions lo = ts.options.loglik;
  lo.greedy = true;
  const auto res = conditional_loglik(model, ll, lo);
  for (size_t k = 0; k < res.size(); ++k) {
    answers[ll_at[k]] = {{"loglikelihood", res[k].loglik},
                         {"is_greedy", res[k].greedy},
                         {"se", res[k].se}};
  }
  for (const auto& [G_asked, idx] : gen_by_len) {
    if (G_asked < 1) {
      throw InputError(str("requests file ", in_path, ": max_gen_toks ", G_asked, " < 1"));
    }
    // lm-eval's default max_gen_toks (256) can exceed a small model's window: at most half of
    // it is generated, said once on stderr.
    const int64_t G = std::min<int64_t>(G_asked, model.max_seq_len() / 2);
    if (G < G_asked) {
      std::cerr << "warning: max_gen_toks " << G_asked << " cut to " << G << " (half of "
                << "model.max_seq_len " << model.max_seq_len() << ")" << std::endl;
    }
    std::vector<std::string> contexts;
    for (size_t i : idx) contexts.push_back(reqs[i]["context"].get<std::string>());
    const auto texts = generate_texts(model, tok, contexts, G, lo.cfg_scale, lo.seed,
                                      ts.options.generation_batch);
    for (size_t q = 0; q < idx.size(); ++q) {
      std::string t = texts[q];
      for (const auto& u : reqs[idx[q]].value("until", std::vector<std::string>{})) {
        const size_t at = u.empty() ? std::string::npos : t.find(u);
        if (at != std::string::npos) t.resize(at);
      }
      answers[idx[q]] = {{"text", t}};
    }
  }
  std::string out;
  for (const auto& a : answers) out += a.dump() + "\n";
  write_file_atomic(out_path, out);
  std::cout << "eval: answered " << answers.size() << " requests (" << ll.size()
            << " log-likelihoods with " << lo.samples << " samples each, "
            << answers.size() - ll.size() << " generations) -> " << out_path << std::endl;
}

// The run folder of a checkpoint folder (RUN/checkpoints/step_N -> RUN).
std::string run_of(const std::string& ckpt) {
  const fs::path p(ckpt);
  if (p.parent_path().filename() == "checkpoints") return p.parent_path().parent_path().string();
  return p.parent_path().string();
}

}  // namespace

int cmd_eval(const EvalArgs& a) {
  install_stop_handlers();
  enable_interrupt_exceptions();
  const std::string ckpt = resolve_checkpoint(a.ckpt);
  nlohmann::json state = verify_checkpoint(ckpt);
  ConfigNode recipe = load_recipe(ckpt + "/recipe.yaml", a.overrides);
  auto model = load_checkpoint_model(ckpt, recipe);
  const TaskSettings ts = TaskSettings::from_recipe(recipe);
  Tokenizer tok = Tokenizer::load(ckpt + "/tokenizer");
  if (tok.vocab_size() != model->vocab_size()) {
    throw CheckpointError(str(ckpt, "/tokenizer: ", tok.vocab_size(), " tokens, the model has ",
                              model->vocab_size()));
  }
  if (!a.requests.empty()) {
    if (a.out.empty()) throw InputError("eval --requests: expected --out FILE for the answers");
    recipe.check_overrides_used();
    answer_requests(*model, tok, ts, a.requests, a.out);
    return 0;
  }
  const bool only_nelbo = a.tasks.size() == 1 && a.tasks[0] == "none";
  const bool nelbo = a.tasks.empty() || only_nelbo;
  auto data = build_data_source(recipe.at("data"));
  TrainOptions o = TrainOptions::from(recipe);
  const bool blocks = nelbo && recipe.has("infer");
  BlockEvalSettings bs;
  std::optional<GenerateSettings> g;
  if (blocks) {
    bs = BlockEvalSettings::from(recipe);
    bs.eval_sequences = o.eval_sequences;
    bs.eval_batch_size = o.eval_batch_size;
    bs.eval_seed = static_cast<uint64_t>(o.eval_seed);
    g = GenerateSettings::from(recipe);
    recipe.at("infer").check_unknown_keys();
    recipe.at("generate").check_unknown_keys();
  }
  recipe.at("eval").check_unknown_keys();
  recipe.check_overrides_used();
  if (data->vocab_size() != model->vocab_size()) {
    throw DataError(str("data.path: the dataset's tokenizer has ", data->vocab_size(),
                        " tokens, the checkpoint's model ", model->vocab_size()));
  }
  // The tasks, read before the long part so that a bad file fails at once.
  std::vector<Task> tasks;
  if (!only_nelbo) {
    const std::string dataset = ts.from.empty() ? data->task_dataset() : ts.from;
    std::vector<Task> builtin;
    const auto names = builtin_task_names();
    const bool wants_builtin =
        a.tasks.empty() || std::any_of(a.tasks.begin(), a.tasks.end(), [&](const std::string& t) {
          return std::find(names.begin(), names.end(), t) != names.end();
        });
    if (wants_builtin && !dataset.empty()) {
      try {
        builtin = builtin_tasks(dataset, ts.max_items);
      } catch (const DataError& e) {
        // Without --task the built-in tasks are extras: a dataset whose corpora cannot be
        // replayed here (not installed) still gets its NELBO.
        if (!a.tasks.empty()) throw;
        std::cerr << "warning: built-in tasks skipped: " << e.what() << std::endl;
      }
    }
    if (a.tasks.empty()) {
      tasks = builtin;
    } else {
      for (const auto& t : a.tasks) {
        if (std::find(names.begin(), names.end(), t) == names.end()) {
          tasks.push_back(read_task(t));
          continue;
        }
        auto it = std::find_if(builtin.begin(), builtin.end(),
                               [&](const Task& b) { return b.name == t; });
        if (it == builtin.end()) {
          throw InputError(str("eval --task ", t, ": the built-in task needs a prepared dataset "
                               "with its corpus (",
                               dataset.empty() ? "this run's data names none; set tasks.from"
                                               : "'" + dataset + "' has none",
                               ")"));
        }
        tasks.push_back(*it);
      }
    }
  }
  nlohmann::json j = {{"checkpoint", ckpt}, {"step", state.at("step")}};
  if (nelbo) {
    auto val = data->val_sequences(o.eval_sequences).to(module_device(*model));
    auto resp = data->val_response(o.eval_sequences);
    const auto t0 = std::chrono::steady_clock::now();
    if (resp.defined()) {  // prompt/response data: the SFT validation bound
      LoglikOptions lo;
      lo.samples = o.eval_final_draws;
      lo.seed = static_cast<uint64_t>(o.eval_seed);
      lo.batch_size = o.eval_batch_size;
      const SftValidation v = sft_validation(*model, val, resp, lo);
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cout << std::fixed << std::setprecision(4) << "eval " << ckpt << " (step "
                << state.at("step").get<int64_t>() << "): val response nelbo " << v.nelbo
                << " ± " << v.se << " (s.e.) nats/response token | " << v.pairs << " pairs, "
                << v.response_tokens << " response tokens x " << lo.samples << " samples | "
                << std::setprecision(1) << secs << " s\n";
      j.update({{"val_nelbo", v.nelbo},
                {"val_nelbo_se", v.se},
                {"val_draws", lo.samples},
                {"val_pairs", v.pairs},
                {"tokens", v.response_tokens}});
    } else {
      NelboResult r = validation_nelbo(*model, val, o.eval_batch_size,
                                       static_cast<uint64_t>(o.eval_seed), 0, 1, {},
                                       o.objective->validation_block(), false,
                                       o.eval_final_draws, o.eval_exact);
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cout << std::fixed << std::setprecision(4) << "eval " << ckpt << " (step "
                << state.at("step").get<int64_t>() << "): val nelbo " << r.nelbo << " ± " << r.se
                << " (s.e.) nats/token | ppl <= " << std::setprecision(2) << r.ppl_bound
                << " | unigram entropy " << std::setprecision(4) << r.unigram_entropy << " | "
                << r.tokens << " tokens | " << std::setprecision(1) << secs << " s\n";
      j.update({{"val_nelbo", r.nelbo},
                {"val_nelbo_se", r.se},
                {"val_draws", r.draws},
                {"val_ppl_bound", r.ppl_bound},
                {"val_unigram_entropy", r.unigram_entropy},
                {"tokens", r.tokens}});
    }
  }
  if (blocks) {
    // MoE models: token-level vs block-routed (with each cache mode); dense ones: the caches.
    j[model->moe_layers().empty() ? "decoding" : "block_routing"] =
        run_block_eval(*model, *data, bs, *g, tok);
  }
  if (!tasks.empty()) {
    nlohmann::json results = nlohmann::json::array();
    for (const auto& t : tasks) {
      nlohmann::json r = run_task(*model, tok, t, ts.options);
      const auto ci = r["acc_ci95"];
      std::cout << std::fixed << std::setprecision(4) << "task " << t.name << " (" << t.kind
                << "): acc " << r["acc"].get<double>() << " [" << ci[0].get<double>() << ", "
                << ci[1].get<double>() << "] (95% Wilson) over " << r["n"].get<int64_t>()
                << " items, chance " << r["chance"].get<double>();
      if (r.contains("acc_norm")) std::cout << ", acc_norm " << r["acc_norm"].get<double>();
      std::cout << " | " << std::setprecision(1) << r["seconds"].get<double>() << " s\n";
      results.push_back(std::move(r));
    }
    j["tasks"] = results;
    nlohmann::json file = {{"checkpoint", ckpt},
                           {"step", state.at("step")},
                           {"options",
                            {{"samples", ts.options.loglik.samples},
                             {"seed", ts.options.loglik.seed},
                             {"cfg_scale", ts.options.loglik.cfg_scale},
                             {"limit", ts.options.limit}}},
                           {"tasks", results}};
    const std::string path = run_of(ckpt) + "/eval_tasks.json";
    write_file_atomic(path, file.dump(2) + "\n");
    std::cout << "tasks: " << path << "\n";
  }
  std::cout << j.dump() << std::endl;
  return 0;
}

void configure_process() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

std::vector<RegistryListing> list_registries() {
  return {models_registry().listing(),      routers_registry().listing(),
          balancers_registry().listing(),   capacity_schedules_registry().listing(),
          block_routing_registry().listing(), dispatchers_registry().listing(),
          objectives_registry().listing(),
          samplers_registry().listing(),
          losses_registry().listing(),      routing_losses_registry().listing(),
          schedules_registry().listing(),
          data_sources_registry().listing(), optimizers_registry().listing(),
          lr_schedules_registry().listing(), corpora_registry().listing(),
          tokenizer_builders().listing()};
}

namespace {

/// The run folder of a run or checkpoint path (the folder holding metrics.jsonl), or "".
std::string run_folder_of(const std::string& path) {
  namespace fs = std::filesystem;
  for (fs::path p = fs::absolute(path); !p.empty() && p != p.root_path(); p = p.parent_path()) {
    if (fs::exists(p / "metrics.jsonl")) return p.string();
    if (p.filename() == "runs") break;
  }
  return "";
}

/// Per-layer routing summary of the last logged step that has MoE telemetry.
void print_routing_summary(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  nlohmann::json last;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded() && j.contains("moe")) last = std::move(j);
  }
  if (last.is_null()) return;
  auto num = [](const nlohmann::json& v, int prec) {
    if (!v.is_number()) return std::string("-");
    std::ostringstream o;
    o << std::fixed << std::setprecision(prec) << v.get<double>();
    return o.str();
  };
  std::cout << "routing of the last logging interval (" << run_dir << "/metrics.jsonl, step "
            << last["step"] << ")\n";
  if (last.contains("aux")) {
    std::cout << "  aux losses (unweighted, mean over layers):";
    for (const auto& [k, v] : last["aux"].items()) std::cout << " " << k << " " << num(v, 4);
    std::cout << "\n";
  }
  std::cout << "  layer    tokens  max/mean      cv  dead  entropy  dropped  experts/token"
               "  zero gate    SRP    SCH  max/mean by mask ratio\n";
  for (const auto& l : last["moe"]["layers"]) {
    char buf[192];
    std::snprintf(buf, sizeof(buf), "  %5lld %9.0f %9s %7s %5lld %8s %8s %14s %10s ",
                  static_cast<long long>(l.value("layer", -1)), l.value("tokens", 0.0),
                  num(l["max_mean"], 3).c_str(), num(l["cv"], 3).c_str(),
                  static_cast<long long>(l.value("dead", 0)), num(l["entropy"], 3).c_str(),
                  num(l["dropped"], 3).c_str(), num(l["experts_per_token"], 2).c_str(),
                  num(l.value("zero_gate", nlohmann::json()), 3).c_str());
    std::cout << buf << std::setw(6) << num(l.value("segment_routing_best", nlohmann::json()), 3)
              << " " << std::setw(6)
              << num(l.value("segment_cache_best_hit", nlohmann::json()), 3) << " ";
    for (const auto& b : l["by_mask_ratio"]) {
      std::cout << " [" << num(b["mask_ratio"][0], 2) << "," << num(b["mask_ratio"][1], 2)
                << ") " << num(b["max_mean"], 2);
    }
    std::cout << "\n";
  }
  const auto& layers = last["moe"]["layers"];
  if (!layers.empty() && layers[0].contains("segment")) {
    std::cout << "  SRP: segment routing best performance, SCH: segment cache best hit rate, "
                 "segments of "
              << layers[0]["segment"].value("length", 0) << " tokens, cache "
              << layers[0]["segment"].value("cache", 0.0) << " x experts per token\n";
  }
  const auto names = last["moe"].value("domains", std::vector<std::string>{});
  if (names.empty()) return;
  std::cout << "expert specialisation by domain (I(expert; domain) / H(domain); 0 independent, "
               "1 each expert one domain) and each domain's busiest experts (share of its "
               "assignments)\n";
  for (const auto& l : layers) {
    std::cout << "  layer " << l.value("layer", -1) << ": specialisation "
              << num(l.value("specialisation", nlohmann::json()), 3) << ", by mask ratio";
    for (const auto& b : l["by_mask_ratio"]) {
      std::cout << " [" << num(b["mask_ratio"][0], 2) << "," << num(b["mask_ratio"][1], 2)
                << ") " << num(b.value("specialisation", nlohmann::json()), 3);
    }
    std::cout << "\n";
    const auto by = l.value("by_domain", nlohmann::json::array());
    for (size_t d = 0; d < by.size() && d < names.size(); ++d) {
      std::vector<double> c = by[d].get<std::vector<double>>();
      double total = 0;
      for (double x : c) total += x;
      std::vector<size_t> order(c.size());
      for (size_t e = 0; e < c.size(); ++e) order[e] = e;
      std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return c[x] > c[y]; });
      std::cout << "    " << std::left << std::setw(12) << names[d] << std::right;
      for (size_t i = 0; i < std::min<size_t>(4, order.size()) && total > 0; ++i) {
        std::cout << "  expert " << order[i] << " " << std::fixed << std::setprecision(1)
                  << 100.0 * c[order[i]] / total << "%";
      }
      std::cout << "  (" << static_cast<int64_t>(total) << " assignments)\n";
    }
  }
}

}  // namespace

int cmd_inspect(const InspectArgs& a) {
  if (a.memory && a.recipe.empty()) {
    throw ConfigError("inspect --memory: expected --recipe RECIPE (the plan is a recipe's)");
  }
  if (a.world != 1 && !a.memory) {
    throw ConfigError("inspect --world: expected with --memory (the ranks the plan is for)");
  }
  if (!a.recipe.empty()) {
    ConfigNode recipe = load_recipe(a.recipe, a.overrides);
    TrainerParts parts = build_trainer_parts(recipe);
    GenerateSettings::from(recipe);
    TaskSettings::from_recipe(recipe);
    recipe.check_unknown_keys();
    if (a.memory) {
      ParallelLayout(a.world, static_cast<int>(parts.options.expert_parallel), 0);
      const MemoryPlan plan = plan_memory(parts, a.world, /*compare=*/true);
      std::cout << parts.model->describe() << "\n" << plan.table();
      return 0;
    }
    std::cout << "# resolved recipe: " << a.recipe << " (" << parts.model->num_parameters()
              << " parameters)\n"
              << recipe.to_yaml();
    return 0;
  }
  if (!a.ckpt.empty()) {
    const std::string ckpt = resolve_checkpoint(a.ckpt);
    nlohmann::json state = verify_checkpoint(ckpt);
    std::map<std::string, std::string> meta;
    TensorMap t = load_safetensors(ckpt + "/model.safetensors", &meta);
    int64_t n = 0;
    for (const auto& kv : t) n += kv.second.numel();
    std::cout << "checkpoint " << ckpt << " (verified)\n"
              << "  step " << state.at("step") << ", tokens " << state.at("tokens")
              << ", data cursor " << state.at("data_cursor") << ", seed " << state.at("seed")
              << ", last val nelbo " << state.value("last_val_nelbo", -1.0) << "\n"
              << "  model: " << meta["model"] << "\n"
              << "  " << t.size() << " tensors, " << n << " parameters, written by LibTorch "
              << state.value("torch_version", std::string("?")) << "\n";
    for (const auto& kv : t) {
      std::cout << "    " << kv.first << " " << kv.second.scalar_type() << " " << kv.second.sizes()
                << "\n";
    }
    const std::string run = run_folder_of(a.ckpt);
    if (!run.empty()) print_routing_summary(run);
    return 0;
  }
  std::cout << "MixDiff registries (built against LibTorch " << compat::torch_version() << ")\n";
  for (const auto& r : list_registries()) {
    std::cout << "\n" << r.kind << ": " << r.help << "\n";
    if (r.entries.empty()) std::cout << "  (none registered)\n";
    for (const auto& [name, help] : r.entries) {
      std::cout << "  " << std::left << std::setw(24) << name << help << "\n";
    }
  }
  return 0;
}

int cmd_data_prepare(const PrepareArgs& a) {
  ConfigNode recipe = load_recipe(a.recipe, a.overrides);
  ConfigNode data = recipe.at("data");
  const std::string kind = data.get<std::string>("kind");
  if (kind == "sft_jsonl") {  // the built-in prompt/response pairs
    prepare_sft_pairs(data, a.force, std::cout);
    recipe.check_overrides_used();
    return 0;
  }
  if (kind != "token_shards") {
    data.fail("kind", "data prepare writes token_shards or the built-in sft_jsonl pairs; got '" +
                          kind + "'");
  }
  // Validate everything `prepare` reads before the long part starts.
  resolve_prepare_spec(data);
  data.at("prepare").check_unknown_keys();
  recipe.check_overrides_used();
  prepare_dataset(data, a.force, std::cout);
  return 0;
}

}  // namespace mixdiff

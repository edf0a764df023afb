#include "eval/tasks.h"
#include "core/hash.h"

#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <tuple>
#include <unordered_set>

#include "core/errors.h"
#include "core/fs.h"
#include "core/json_util.h"
#include "data/prepare.h"
#include "infer/sampler.h"
#include "report/stats.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

// A small deterministic generator (the built-in tasks must not depend on the C++ library's
// distributions).
struct Rng {
  uint64_t s;
  uint64_t next() { return s = splitmix64(s); }
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }
};

template <class T>
void shuffle(std::vector<T>& v, Rng& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool is_word_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '\'' || c == '-';
}

// Whether `word` occurs in `text` as a whole word (case-insensitive).
bool contains_word(const std::string& text, const std::string& word) {
  const std::string t = lower(text), w = lower(word);
  if (w.empty()) return false;
  for (size_t at = t.find(w); at != std::string::npos; at = t.find(w, at + 1)) {
    const bool left = at == 0 || !is_word_char(t[at - 1]);
    const bool right = at + w.size() >= t.size() || !is_word_char(t[at + w.size()]);
    if (left && right) return true;
  }
  return false;
}

std::vector<std::string> split_list(const std::string& s, const std::string& sep) {
  std::vector<std::string> out;
  size_t b = 0;
  for (size_t e = s.find(sep); e != std::string::npos; e = s.find(sep, b)) {
    out.push_back(s.substr(b, e - b));
    b = e + sep.size();
  }
  out.push_back(s.substr(b));
  return out;
}

size_t count_words(const std::string& s) {
  std::istringstream in(s);
  size_t n = 0;
  for (std::string w; in >> w;) ++n;
  return n;
}

struct Synset {
  std::string pos, lemma, definition;
  std::vector<std::string> lemmas;
};

Task make_wordnet_mc(const std::vector<Synset>& val, const std::vector<Synset>& all,
                     const std::unordered_set<std::string>& train_definitions) {
  Task t;
  t.name = "wordnet_mc";
  t.kind = "multiple_choice";
  std::map<std::string, std::vector<std::string>> by_pos;  // distinct first lemmas per POS
  {
    std::map<std::string, std::set<std::string>> seen;
    for (const auto& s : all) {
      if (seen[s.pos].insert(s.lemma).second) by_pos[s.pos].push_back(s.lemma);
    }
  }
  Rng rng{0x77087e7ULL};
  for (const auto& s : val) {
    if (count_words(s.definition) < 3 || train_definitions.count(s.definition)) continue;
    bool names_itself = false;
    for (const auto& l : s.lemmas) names_itself = names_itself || contains_word(s.definition, l);
    if (names_itself) continue;
    const auto& pool = by_pos[s.pos];
    std::vector<std::string> words{s.lemma};
    for (int tries = 0; words.size() < 4 && tries < 200; ++tries) {
      const std::string& w = pool[rng.below(pool.size())];
      if (std::find(words.begin(), words.end(), w) != words.end()) continue;
      if (std::find(s.lemmas.begin(), s.lemmas.end(), w) != s.lemmas.end()) continue;
      words.push_back(w);
    }
    if (words.size() < 4) continue;
    const size_t gold = rng.below(4);
    std::swap(words[0], words[gold]);
    ChoiceItem item;
    for (const auto& w : words) {
      item.contexts.push_back(w + " (" + s.pos + "):");
      item.continuations.push_back(" " + s.definition);
    }
    item.gold = static_cast<int64_t>(gold);
    t.choice_items.push_back(std::move(item));
  }
  return t;
}

Task make_kjv_cloze(const std::vector<std::string>& val_chapters, const std::string& train_text) {
  Task t;
  t.name = "kjv_cloze";
  t.kind = "generation";
  for (const auto& ch : val_chapters) {
    // Sentence ends: '.', '?' or '!' followed by a space or the end of the chapter.
    std::vector<size_t> ends;
    for (size_t i = 0; i < ch.size(); ++i) {
      const char c = ch[i];
      if ((c == '.' || c == '?' || c == '!') && (i + 1 == ch.size() || ch[i + 1] == ' ')) {
        ends.push_back(i);
      }
    }
    for (size_t k = 0; k < ends.size(); ++k) {
      const size_t e = ends[k];
      size_t w0 = e;
      while (w0 > 0 && std::isalpha(static_cast<unsigned char>(ch[w0 - 1]))) --w0;
      const std::string target = ch.substr(w0, e - w0);
      if (target.size() < 3 || w0 == 0 || ch[w0 - 1] != ' ') continue;
      // The passage: whole sentences back from this one, at most 50 words (the sentence's own
      // last 50 when it is longer).
      const size_t sentence_start = k == 0 ? 0 : ends[k - 1] + 2;
      if (sentence_start >= w0) continue;
      size_t start = sentence_start;
      for (size_t j = k; j-- > 0;) {
        const size_t s = j == 0 ? 0 : ends[j - 1] + 2;
        if (count_words(ch.substr(s, w0 - s)) > 50) break;
        start = s;
      }
      std::string context = ch.substr(start, w0 - 1 - start);
      std::istringstream in(context);
      std::vector<std::string> words;
      for (std::string w; in >> w;) words.push_back(w);
      if (words.size() > 50) {
        context.clear();
        for (size_t i = words.size() - 50; i < words.size(); ++i) {
          context += (context.empty() ? "" : " ") + words[i];
        }
      }
      if (count_words(context) < 8) continue;
      // Leakage: the final sentence also in a training chapter.
      if (train_text.find(ch.substr(sentence_start, e + 1 - sentence_start)) != std::string::npos) {
        continue;
      }
      t.generation_items.push_back({context, target, 4});
    }
  }
  return t;
}

template <class T>
void cap_items(std::vector<T>& items, int64_t max_items, uint64_t seed) {
  if (max_items <= 0 || static_cast<int64_t>(items.size()) <= max_items) return;
  std::vector<size_t> idx(items.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  Rng rng{seed};
  shuffle(idx, rng);
  idx.resize(static_cast<size_t>(max_items));
  std::sort(idx.begin(), idx.end());
  std::vector<T> kept;
  for (size_t i : idx) kept.push_back(items[i]);
  items = std::move(kept);
}

}  // namespace

double Task::chance() const {
  if (kind == "generation") {
    if (generation_items.empty()) return 0;
    std::map<std::string, int64_t> counts;
    int64_t best = 0;
    for (const auto& g : generation_items) best = std::max(best, ++counts[g.target]);
    return static_cast<double>(best) / static_cast<double>(generation_items.size());
  }
  if (choice_items.empty()) return 0;
  double sum = 0;
  for (const auto& c : choice_items) sum += 1.0 / static_cast<double>(c.contexts.size());
  return sum / static_cast<double>(choice_items.size());
}

Task read_task(const std::string& path) {
  Task t;
  t.name = fs::path(path).stem().string();
  for_each_json_line(read_file(path, "task file"), "task file " + path,
                     [&](const nlohmann::json& j, int64_t n) {
    auto fail = [&](const std::string& why) {
      throw InputError(str("task file ", path, " line ", n, ": ", why));
    };
    auto get_string = [&](const char* key) {
      if (!j.contains(key) || !j[key].is_string()) fail(str("expected a string field \"", key, "\""));
      return j[key].get<std::string>();
    };
    auto get_strings = [&](const char* key) {
      if (!j.contains(key) || !j[key].is_array() || j[key].size() < 2) {
        fail(str("expected \"", key, "\": a list of at least two strings"));
      }
      std::vector<std::string> v;
      for (const auto& e : j[key]) {
        if (!e.is_string()) fail(str("expected \"", key, "\": a list of strings"));
        v.push_back(e.get<std::string>());
      }
      return v;
    };
    const std::string kind = j.contains("target") ? "generation" : "multiple_choice";
    if (t.kind.empty()) t.kind = kind;
    if (kind != t.kind) {
      fail(str("a ", kind, " item in a ", t.kind, " task (one kind per file: \"target\" marks "
               "generation, \"choices\" or \"contexts\" multiple choice)"));
    }
    if (kind == "generation") {
      GenerationItem g{get_string("context"), get_string("target"), 4};
      if (j.contains("max_tokens")) {
        if (!j["max_tokens"].is_number_integer() || j["max_tokens"].get<int64_t>() < 1) {
          fail("expected \"max_tokens\": a positive integer");
        }
        g.max_tokens = j["max_tokens"].get<int64_t>();
      }
      if (first_word(g.target) != g.target) {
        fail(str("\"target\" must be one word (exact match compares the answer's first word), "
                 "got \"", g.target, "\""));
      }
      t.generation_items.push_back(std::move(g));
      return;
    }
    ChoiceItem c;
    if (j.contains("contexts")) {
      c.contexts = get_strings("contexts");
      c.continuations.assign(c.contexts.size(), get_string("continuation"));
    } else {
      c.continuations = get_strings("choices");
      c.contexts.assign(c.continuations.size(), get_string("context"));
    }
    if (!j.contains("gold") || !j["gold"].is_number_integer()) {
      fail("expected \"gold\": the index of the right choice");
    }
    c.gold = j["gold"].get<int64_t>();
    if (c.gold < 0 || c.gold >= static_cast<int64_t>(c.contexts.size())) {
      fail(str("\"gold\" ", c.gold, " is not the index of a choice (0..", c.contexts.size() - 1,
               ")"));
    }
    t.choice_items.push_back(std::move(c));
  });
  if (t.kind.empty()) throw InputError(str("task file ", path, ": no items"));
  return t;
}

void write_task(const Task& t, const std::string& path) {
  std::string out;
  if (t.kind == "generation") {
    for (const auto& g : t.generation_items) {
      out += nlohmann::json{{"context", g.context}, {"target", g.target}, {"max_tokens", g.max_tokens}}
                 .dump() +
             "\n";
    }
  } else {
    for (const auto& c : t.choice_items) {
      const bool shared_context =
          std::all_of(c.contexts.begin(), c.contexts.end(),
                      [&](const std::string& s) { return s == c.contexts[0]; });
      nlohmann::json j;
      if (shared_context) {
        j = {{"context", c.contexts[0]}, {"choices", c.continuations}, {"gold", c.gold}};
      } else {
        j = {{"contexts", c.contexts}, {"continuation", c.continuations[0]}, {"gold", c.gold}};
      }
      out += j.dump() + "\n";
    }
  }
  write_file_atomic(path, out);
}

std::vector<std::string> builtin_task_names() { return {"wordnet_mc", "kjv_cloze"}; }

std::vector<Task> builtin_tasks(const std::string& dataset_path, int64_t max_items) {
  const std::string dir = dataset_path + "/tasks";
  const std::string stamp = dir + "/built.json";
  const nlohmann::json want{{"max_items", max_items}, {"version", 1}};
  std::vector<Task> tasks;
  if (fs::exists(stamp) && nlohmann::json::parse(read_file(stamp)) == want) {
    const auto made = nlohmann::json::parse(read_file(stamp + ".tasks"));
    for (const auto& name : made) tasks.push_back(read_task(dir + "/" + name.get<std::string>() + ".jsonl"));
    return tasks;
  }
  std::vector<Synset> wn_val, wn_all;
  std::unordered_set<std::string> wn_train_definitions;
  std::vector<std::string> kjv_val;
  std::string kjv_train;
  for_each_split_document(dataset_path, [&](const SplitDocument& d) {
    const auto corpus = d.fields.find("corpus");
    if (corpus == d.fields.end()) return;
    if (corpus->second == "wordnet") {
      Synset s;
      s.pos = d.fields.at("pos");
      s.definition = d.fields.at("definition");
      s.lemmas = split_list(d.fields.at("lemmas"), ", ");
      s.lemma = s.lemmas[0];
      wn_all.push_back(s);
      if (d.validation) {
        wn_val.push_back(std::move(s));
      } else {
        wn_train_definitions.insert(s.definition);
      }
    } else if (corpus->second == "kjv") {
      if (d.validation) {
        kjv_val.emplace_back(d.text);
      } else {
        kjv_train.append(d.text);
        kjv_train.push_back('\n');
      }
    }
  });
  if (!wn_val.empty()) {
    tasks.push_back(make_wordnet_mc(wn_val, wn_all, wn_train_definitions));
    cap_items(tasks.back().choice_items, max_items, 0x3c1ULL);
  }
  if (!kjv_val.empty()) {
    tasks.push_back(make_kjv_cloze(kjv_val, kjv_train));
    cap_items(tasks.back().generation_items, max_items, 0x3c2ULL);
  }
  tasks.erase(std::remove_if(tasks.begin(), tasks.end(), [](const Task& t) { return t.size() == 0; }),
              tasks.end());
  fs::create_directories(dir);
  nlohmann::json made = nlohmann::json::array();
  for (const auto& t : tasks) {
    write_task(t, dir + "/" + t.name + ".jsonl");
    made.push_back(t.name);
  }
  write_file_atomic(stamp + ".tasks", made.dump() + "\n");
  write_file_atomic(stamp, want.dump() + "\n");
  return tasks;
}

LoglikRequest encode_pair(const Tokenizer& tok, const std::string& context,
                          const std::string& continuation, int64_t max_len) {
  LoglikRequest r;
  std::tie(r.context, r.continuation) = mixdiff::encode_pair(tok, context, continuation);
  if (r.continuation.empty()) throw InputError("likelihood request: empty continuation");
  const int64_t room = max_len - static_cast<int64_t>(r.continuation.size());
  if (room < 0) {
    throw InputError(str("likelihood request: the continuation has ", r.continuation.size(),
                         " tokens, more than the model's max_seq_len ", max_len));
  }
  if (static_cast<int64_t>(r.context.size()) > room) {
    r.context.erase(r.context.begin(),
                    r.context.end() - static_cast<std::ptrdiff_t>(room));
  }
  return r;
}

std::string first_word(const std::string& text) {
  size_t b = 0;
  while (b < text.size() && std::isspace(static_cast<unsigned char>(text[b]))) ++b;
  size_t e = b;
  while (e < text.size()) {
    const char c = text[e];
    const bool ascii_alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (!ascii_alnum && c != '\'' && c != '-') break;
    ++e;
  }
  return text.substr(b, e - b);
}

std::vector<std::string> generate_texts(ModelBase& model, const Tokenizer& tok,
                                        const std::vector<std::string>& contexts, int64_t G,
                                        double cfg_scale, uint64_t seed, int64_t batch) {
  ConfigNode sc = ConfigNode::from_string(
      str("{kind: llada, gen_length: ", G, ", steps: ", G, ", block_length: ", G,
          ", temperature: 0, cfg_scale: ", cfg_scale, "}"),
      "task sampler");
  auto sampler = samplers_registry().create("llada", "task sampler.kind", sc);
  const int64_t room = model.max_seq_len() - G;
  if (room < 1) {
    throw InputError(str("generation: ", G, " new tokens leave no room for a context in "
                         "model.max_seq_len ", model.max_seq_len()));
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Device dev = module_device(model);
  std::vector<std::string> out;
  for (size_t s = 0; s < contexts.size(); s += static_cast<size_t>(batch)) {
    const size_t e = std::min(contexts.size(), s + static_cast<size_t>(batch));
    std::vector<std::vector<int32_t>> prompts;
    for (size_t q = s; q < e; ++q) {
      auto ids = tok.encode(contexts[q]);
      if (static_cast<int64_t>(ids.size()) > room) {
        ids.erase(ids.begin(), ids.end() - static_cast<std::ptrdiff_t>(room));
      }
      prompts.push_back(std::move(ids));
    }
    const auto [x, valid] = left_pad(prompts, tok.eos_id());
    const int64_t B = x.size(0), P = x.size(1);
    auto res = sampler->generate_padded(model, x.to(dev), valid.to(dev), gen).tokens_BL.cpu();
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int32_t> ids;
      for (int64_t i = 0; i < G; ++i) {
        const int64_t id = res[b][P + i].item<int64_t>();
        if (id == tok.eos_id()) break;
        ids.push_back(static_cast<int32_t>(id));
      }
      out.push_back(tok.decode(ids));
    }
  }
  return out;
}

nlohmann::json run_task(ModelBase& model, const Tokenizer& tok, const Task& task,
                        const TaskOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  nlohmann::json examples = nlohmann::json::array();
  int64_t n = static_cast<int64_t>(task.size());
  if (o.limit > 0) n = std::min(n, o.limit);
  int64_t correct = 0, correct_norm = 0;
  double se_sum = 0;
  int64_t se_n = 0;
  if (task.kind == "multiple_choice") {
    std::vector<LoglikRequest> reqs;
    for (int64_t i = 0; i < n; ++i) {
      const auto& c = task.choice_items[static_cast<size_t>(i)];
      for (size_t k = 0; k < c.contexts.size(); ++k) {
        reqs.push_back(encode_pair(tok, c.contexts[k], c.continuations[k], model.max_seq_len()));
      }
    }
    const auto res = conditional_loglik(model, reqs, o.loglik);
    size_t at = 0;
    for (int64_t i = 0; i < n; ++i) {
      const auto& c = task.choice_items[static_cast<size_t>(i)];
      std::vector<double> ll, per_byte;
      for (size_t k = 0; k < c.contexts.size(); ++k, ++at) {
        ll.push_back(res[at].loglik);
        per_byte.push_back(res[at].loglik / std::max<double>(1, c.continuations[k].size()));
        se_sum += res[at].se;
        ++se_n;
      }
      // The first of equal maxima wins (lm-eval's argmax).
      const int64_t best = std::max_element(ll.begin(), ll.end()) - ll.begin();
      const int64_t best_norm = std::max_element(per_byte.begin(), per_byte.end()) - per_byte.begin();
      correct += best == c.gold;
      correct_norm += best_norm == c.gold;
      if (examples.size() < 3) {
        nlohmann::json ex{{"gold", c.gold}, {"predicted", best}, {"loglik", ll}};
        ex["contexts"] = c.contexts;
        ex["continuations"] = c.continuations;
        examples.push_back(std::move(ex));
      }
    }
  } else {
    // Grouped by answer length; one left-padded batch per `generation_batch` items.
    std::map<int64_t, std::vector<int64_t>> by_len;
    for (int64_t i = 0; i < n; ++i) {
      by_len[task.generation_items[static_cast<size_t>(i)].max_tokens].push_back(i);
    }
    for (const auto& [G, items] : by_len) {
      std::vector<std::string> contexts;
      for (int64_t i : items) contexts.push_back(task.generation_items[static_cast<size_t>(i)].context);
      const auto texts = generate_texts(model, tok, contexts, G, o.loglik.cfg_scale,
                                        o.loglik.seed, o.generation_batch);
      for (size_t q = 0; q < items.size(); ++q) {
        const auto& item = task.generation_items[static_cast<size_t>(items[q])];
        const std::string answer = first_word(texts[q]);
        correct += answer == item.target;
        if (examples.size() < 3) {
          examples.push_back({{"context", item.context},
                              {"target", item.target},
                              {"generated", texts[q]},
                              {"answer", answer}});
        }
      }
    }
  }
  const Proportion p = wilson_interval(correct, n);
  nlohmann::json r{{"task", task.name},
                   {"kind", task.kind},
                   {"n", n},
                   {"correct", correct},
                   {"acc", p.p},
                   {"acc_ci95", {p.lo, p.hi}},
                   {"chance", task.chance()}};
  if (task.kind == "multiple_choice") {
    const Proportion pn = wilson_interval(correct_norm, n);
    r["acc_norm"] = pn.p;
    r["acc_norm_ci95"] = {pn.lo, pn.hi};
    r["samples"] = o.loglik.samples;
    r["mean_loglik_se"] = se_n > 0 ? se_sum / static_cast<double>(se_n) : 0.0;
  }
  r["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r["examples"] = std::move(examples);
  return r;
}

TaskSettings TaskSettings::from_recipe(const ConfigNode& recipe) {
  TaskSettings t;
  ConfigNode c = recipe.section("tasks");
  t.options.loglik.samples = c.get<int64_t>("samples", 16);
  t.options.loglik.seed = static_cast<uint64_t>(c.get<int64_t>("seed", 0));
  t.options.loglik.cfg_scale = c.get<double>("cfg_scale", 0.0);
  t.options.loglik.batch_size = c.get<int64_t>("batch_size", 64);
  t.options.limit = c.get<int64_t>("limit", 0);
  t.max_items = c.get<int64_t>("max_items", 500);
  t.from = c.get<std::string>("from", "");
  t.run = c.get<std::vector<std::string>>("run", {});
  if (t.options.loglik.samples < 1) c.fail("samples", "expected a positive number of samples");
  if (t.options.loglik.batch_size < 1) c.fail("batch_size", "expected a positive batch size");
  if (!(t.options.loglik.cfg_scale >= 0)) c.fail("cfg_scale", "expected >= 0 (0: no guidance)");
  if (t.options.limit < 0) c.fail("limit", "expected >= 0 (0: every item)");
  if (t.max_items < 0) c.fail("max_items", "expected >= 0 (0: no cap)");
  c.check_unknown_keys();
  return t;
}

}  // namespace mixdiff

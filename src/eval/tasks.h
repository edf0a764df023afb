// Downstream tasks scored by a MixDiff checkpoint (`mixdiff eval --task`): multiple choice by
// conditional likelihood (eval/likelihood.h, the way lm-eval scores multiple choice) and
// generation by exact match after the sampler.
//
// Task files are JSON Lines, one item per line, one kind per file:
//   multiple choice  {"context": "...", "choices": ["...", ...], "gold": 0}
//                    choice i scores log p(choices[i] | context) (lm-eval's form), or
//                    {"contexts": ["...", ...], "continuation": "...", "gold": 0}
//                    choice i scores log p(continuation | contexts[i]) (lm-eval's "partial
//                    evaluation", as in Winogrande: the choices sit in the context and the
//                    shared continuation is scored)
//   generation       {"context": "...", "target": "...", "max_tokens": 4}
//                    the sampler decodes max_tokens tokens after the context (LLaDA's
//                    low-confidence remasking, greedy, one token per step, one block); the
//                    answer is the first word of the text, compared exactly with the target
// Accuracy comes with its 95% Wilson interval and a chance level: the mean of 1 / (number of
// choices) for multiple choice, the share of the most frequent target for generation (what
// always answering that word scores).
// A pair is tokenised as lm-eval does: trailing spaces of the context move to the
// continuation, the continuation's tokens are those of context + continuation after the
// context's; a context too long for the model loses tokens from the left.
//
// Built-in tasks, made from held-out documents of a prepared dataset whose corpora include them
// (builtin_tasks):
//   wordnet_mc  4-way: which word does this definition define. A validation WordNet synset gives
//               the definition (its gloss without the quoted examples) and the gold word (its
//               first lemma); three distractors are first lemmas of other synsets of the same
//               part of speech. Partial-evaluation form: contexts "WORD (POS):", continuation
//               " DEFINITION" (the corpus's own "lemmas: gloss" order).
//   kjv_cloze   LAMBADA-like: a passage of a validation KJV chapter ending a sentence; predict its
//               last word (a word of at least three letters) by generation.
// Leakage: only documents that preparation put in the validation split (the same seeded hash,
// replayed from the dataset's spec) are used, and an item is dropped when its text also occurs
// in a training document (WordNet: the same definition; KJV: the passage's final sentence; the
// KJV repeats verses across books).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "data/tokenizer.h"
#include "eval/likelihood.h"
#include "model/model.h"

namespace mixdiff {

struct ChoiceItem {
  /// Choice i is the pair (contexts[i], continuations[i]).
  std::vector<std::string> contexts, continuations;
  int64_t gold = 0;
};

struct GenerationItem {
  std::string context, target;
  int64_t max_tokens = 4;
};

struct Task {
  std::string name;
  std::string kind;  ///< "multiple_choice" or "generation"
  std::vector<ChoiceItem> choice_items;
  std::vector<GenerationItem> generation_items;
  size_t size() const { return kind == "generation" ? generation_items.size() : choice_items.size(); }
  /// Expected accuracy of a guess (see above).
  double chance() const;
};

/// Reads a task file; InputError naming the file, line and field on anything malformed. The
/// task's name is the file's stem.
Task read_task(const std::string& path);
/// Writes a task file atomically (JSON Lines in the first form of each kind above, or the
/// partial-evaluation form when its items have one context per choice).
void write_task(const Task& task, const std::string& path);

/// The built-in tasks of the dataset prepared at `dataset_path` (those its corpora allow; empty
/// when none). Made once and kept as `dataset_path/tasks/NAME.jsonl`, from where lm-eval can
/// read them too. `max_items` caps each task (0: no cap) by a seeded choice.
std::vector<Task> builtin_tasks(const std::string& dataset_path, int64_t max_items = 500);
/// Names of the built-in tasks.
std::vector<std::string> builtin_task_names();

/// The tokens of a (context, continuation) pair, tokenised as lm-eval does (see above), with the
/// context cut from the left to fit `max_len` tokens in all.
LoglikRequest encode_pair(const Tokenizer& tok, const std::string& context,
                          const std::string& continuation, int64_t max_len);

struct TaskOptions {
  LoglikOptions loglik;  ///< samples, batch size, seed, cfg_scale of multiple choice
  int64_t limit = 0;     ///< score the first `limit` items only (0: all)
  int64_t generation_batch = 32;
};

/// The recipe's `tasks` section (all keys optional; `--set tasks.KEY=VALUE`): samples (16, Monte-
/// Carlo samples per choice), seed (0), cfg_scale (0), batch_size (64), limit (0: every item),
/// max_items (500: the cap of each built-in task), from (the dataset of the built-in tasks;
/// default the run's data), run (task names or files `train` scores on its final checkpoint,
/// into RUN/eval_tasks.json, as `mixdiff eval --task` would: sweeps show their accuracies; default
/// none). Read by `train` and `eval`.
struct TaskSettings {
  TaskOptions options;
  int64_t max_items = 500;
  std::string from;
  std::vector<std::string> run;
  static TaskSettings from_recipe(const ConfigNode& recipe);
};

/// Scores a task: {"task", "kind", "n", "correct", "acc", "acc_ci95": [lo, hi], "chance",
/// "seconds", "examples": [first items with the model's answer]} and for multiple choice also
/// "acc_norm" (log-likelihood per byte of the continuation, lm-eval's acc_norm) and
/// "mean_loglik_se" (the Monte-Carlo standard error of a choice's log-likelihood, averaged).
nlohmann::json run_task(ModelBase& model, const Tokenizer& tok, const Task& task,
                        const TaskOptions& options);

/// Greedy generation of G tokens after each context (LLaDA's low-confidence remasking, one
/// block, one token per step; cfg_scale: unsupervised guidance), in left-padded batches; the
/// texts stop at EOS. Contexts too long lose tokens from the left.
std::vector<std::string> generate_texts(ModelBase& model, const Tokenizer& tok,
                                        const std::vector<std::string>& contexts, int64_t G,
                                        double cfg_scale, uint64_t seed, int64_t batch = 32);

/// The first word of a generated text: leading white space skipped, then the longest run of
/// ASCII letters, digits, apostrophes and hyphens (the regular expression ^\s*([A-Za-z0-9'-]*),
/// which the lm-eval task file of kjv_cloze applies too); "" when the text starts otherwise.
std::string first_word(const std::string& text);

}  // namespace mixdiff

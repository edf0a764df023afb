#!/usr/bin/env python3
"""Runs EleutherAI's lm-evaluation-harness (PyPI `lm-eval`) against a MixDiff checkpoint.

lm-eval's requests go to MixDiff in one batch per request type: they are written as JSON Lines,
answered by one `mixdiff eval --ckpt RUN --requests IN --out OUT` call, and read back:
  loglikelihood          MixDiff's Monte-Carlo bound of log p(continuation | context) (the
                         recipe's `tasks.samples` samples, LLaDA's estimator; src/eval/
                         likelihood.h) and is_greedy: every continuation token is the argmax when
                         the whole continuation is masked
  loglikelihood_rolling  the same bound of the whole text (it must fit model.max_seq_len)
  generate_until         greedy decoding of max_gen_toks tokens (LLaDA's low-confidence
                         remasking, one block, one token per step), cut at the `until` strings
The tokenisation is MixDiff's own and the same as `mixdiff eval --task` (context and continuation
as lm-eval's HF models make them), and the estimate of a request depends only on its tokens and
the seed, so a task scores the same here as in `mixdiff eval` (tests/eval/lm_eval_test.py).

Usage (from the repository root, with tools/setup.sh --tests --torch2 done):
  .venv/bin/python tools/lm_eval_mixdiff.py --ckpt runs/quickstart \\
      --tasks mixdiff_wordnet_mc,mixdiff_kjv_cloze --include_path tools/lm_eval_tasks
Options: --limit N (items per task), --set KEY=VALUE (passed to mixdiff, e.g. tasks.samples=32),
--binary PATH (default build/mixdiff), --output FILE (the results as JSON).
The task files in tools/lm_eval_tasks read datasets/default/tasks/*.jsonl (written by
`mixdiff eval` the first time it runs the built-in tasks); any lm-eval task works the same way.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@register_model("mixdiff")
class MixDiffLM(LM):
    """lm-eval model backed by the `mixdiff` binary."""

    def __init__(self, ckpt, binary=None, overrides=(), **kwargs):
        super().__init__()
        self.ckpt = ckpt
        self.binary = binary or os.path.join(ROOT, "build", "mixdiff")
        self.overrides = list(overrides)
        self.calls = 0

    def _answer(self, requests):
        if not requests:
            return []
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "requests.jsonl"), os.path.join(d, "answers.jsonl")
            with open(src, "w", encoding="utf-8") as f:
                for r in requests:
                    f.write(json.dumps(r) + "\n")
            cmd = [self.binary, "eval", "--ckpt", self.ckpt, "--requests", src, "--out", dst]
            for o in self.overrides:
                cmd += ["--set", o]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError("mixdiff eval failed: " + done.stderr.strip())
            self.calls += 1
            with open(dst, encoding="utf-8") as f:
                answers = [json.loads(line) for line in f if line.strip()]
        if len(answers) != len(requests):
            raise RuntimeError(f"mixdiff answered {len(answers)} of {len(requests)} requests")
        return answers

    def loglikelihood(self, requests, disable_tqdm=False):
        answers = self._answer([
            {"request_type": "loglikelihood", "context": r.args[0], "continuation": r.args[1]}
            for r in requests
        ])
        return [(a["loglikelihood"], bool(a["is_greedy"])) for a in answers]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        answers = self._answer([
            {"request_type": "loglikelihood_rolling", "context": r.args[0]} for r in requests
        ])
        return [a["loglikelihood"] for a in answers]

    def generate_until(self, requests, disable_tqdm=False):
        batch = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1]) if len(r.args) > 1 else {}
            until = kwargs.get("until", [])
            if isinstance(until, str):
                until = [until]
            batch.append({"request_type": "generate_until", "context": context, "until": until,
                          "max_gen_toks": int(kwargs.get("max_gen_toks", 32))})
        return [a["text"] for a in self._answer(batch)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="MixDiff run or checkpoint folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include_path", default=None, help="folder of extra lm-eval task files")
    p.add_argument("--limit", type=int, default=None, help="items per task")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="KEY=VALUE passed to mixdiff eval (e.g. tasks.samples=32)")
    p.add_argument("--binary", default=None, help="the mixdiff binary (default build/mixdiff)")
    p.add_argument("--output", default=None, help="write the results here as JSON")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON only, never the hub
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = MixDiffLM(a.ckpt, binary=a.binary, overrides=a.overrides)
    tm = TaskManager(include_path=a.include_path) if a.include_path else TaskManager()
    res = lm_eval.simple_evaluate(model=lm, tasks=a.tasks.split(","), task_manager=tm,
                                  limit=a.limit, bootstrap_iters=0, log_samples=False)
    out = {}
    for task, metrics in sorted(res["results"].items()):
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(out[task].items())
                          if not k.endswith("_stderr,none") and isinstance(v, float))
        print(f"lm-eval {task}: {shown}")
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

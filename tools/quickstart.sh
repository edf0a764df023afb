#!/usr/bin/env bash
# The main job: install, build, prepare the built-in English corpus, train the quickstart
# recipe, and print a generated sample. Running it again continues (or re-uses) the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
tools/build.sh
./build/mixdiff data prepare recipes/quickstart.yaml
if [ -d runs/quickstart/checkpoints ]; then
  ./build/mixdiff train --resume runs/quickstart
else
  ./build/mixdiff train recipes/quickstart.yaml
fi
./build/mixdiff generate --ckpt runs/quickstart

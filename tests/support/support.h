// Helpers shared by the test files: scratch folders, a tiny recipe over the fixture corpus,
// and running the `mixdiff` binary as a user would.
#pragma once

#include <string>
#include <vector>

namespace mixdiff::test {

/// A fresh, empty folder under the system temp dir, unique to this process and `name`.
std::string scratch_dir(const std::string& name);

/// YAML of a tiny recipe (seconds on 2 cores) whose data lives in `data_dir`; `extra` is
/// appended verbatim (later keys of the same name are not allowed in YAML, so use overrides).
std::string tiny_recipe(const std::string& data_dir);

/// Writes `tiny_recipe(data_dir)` to `dir/recipe.yaml`, prepares the data once per data_dir,
/// and returns the recipe path.
std::string tiny_setup(const std::string& dir, const std::string& data_dir);

/// A scratch folder `name` holding recipe.yaml (tiny_recipe) and its prepared data in data/,
/// made on the first call for that name in this process.
const std::string& tiny_dir(const std::string& name);

struct CmdResult {
  int status = -1;   ///< exit status, or 128 + signal when killed
  std::string out;   ///< stdout
  std::string err;   ///< stderr
};

/// Runs the built `mixdiff` binary with `args` in working folder `cwd` and waits for it;
/// `env` ("KEY=value") is added to this process's environment.
CmdResult run_mixdiff(const std::vector<std::string>& args, const std::string& cwd = ".",
                      const std::vector<std::string>& env = {});

/// Path of the built binary and of the source tree.
std::string mixdiff_binary();
std::string source_dir();
std::string fixtures_dir();

/// A TCP port for a test's rendezvous: distinct per process and per call.
int free_port();

/// Non-empty lines of `s`.
std::vector<std::string> lines(const std::string& s);

std::string read_text(const std::string& path);
void write_text(const std::string& path, const std::string& text);
/// Writes `dir`/sweep.yaml: `body` under a `base:` of the tiny fixture recipe; returns its path.
std::string write_sweep(const std::string& dir, const std::string& body);

}  // namespace mixdiff::test

namespace mixdiff::test {

/// Starts `mixdiff args` without waiting; stdout/stderr go to the given files.
int spawn_mixdiff(const std::vector<std::string>& args, const std::string& out_path,
                  const std::string& err_path, const std::vector<std::string>& env = {});
/// Waits for a spawned process; exit status, or 128 + signal.
int wait_for(int pid);

}  // namespace mixdiff::test

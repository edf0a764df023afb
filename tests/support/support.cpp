#include "support/support.h"

#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

#include "core/config.h"
#include "data/prepare.h"

extern char** environ;

namespace mixdiff::test {

namespace fs = std::filesystem;

std::string mixdiff_binary() { return MIXDIFF_BINARY; }
std::string source_dir() { return MIXDIFF_SOURCE_DIR; }
std::string fixtures_dir() { return MIXDIFF_FIXTURES_DIR; }

std::string scratch_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("mixdiff_tests_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

std::string tiny_recipe(const std::string& data_dir) {
  const std::string corpus = fixtures_dir() + "/tiny_corpus.txt";
  return "name: tiny\n"
         "seed: 0\n"
         "model: {kind: dense_dlm, d_model: 32, n_layer: 2, n_head: 2, d_ff: 64, max_seq_len: 64}\n"
         "diffusion: {schedule: {kind: linear}}\n"
         "losses: [{kind: masked_diffusion_elbo}]\n"
         "data:\n"
         "  kind: token_shards\n"
         "  path: " + data_dir + "\n"
         "  seq_len: 32\n"
         "  prepare:\n"
         "    corpora: [{kind: text_files, paths: [" + corpus + ", " + corpus + ", " + corpus +
         ", " + corpus + "]}]\n"
         "    tokenizer: {kind: byte_bpe, vocab_size: 320, min_frequency: 1}\n"
         "    val_fraction: 0.2\n"
         "optim: {kind: adamw, lr: 0.01}\n"
         "lr_schedule: {kind: constant, warmup_steps: 5}\n"
         "train: {steps: 30, batch_size: 8, log_every: 1}\n"
         "eval: {sequences: 8, batch_size: 8}\n"
         "generate: {prompt: \"The cat\", sampler: {kind: llada, gen_length: 16, steps: 16, "
         "block_length: 8}}\n";
}

std::string tiny_setup(const std::string& dir, const std::string& data_dir) {
  const std::string path = dir + "/recipe.yaml";
  write_text(path, tiny_recipe(data_dir));
  ConfigNode r = ConfigNode::from_file(path);
  std::ostringstream log;
  prepare_dataset(r.at("data"), /*force=*/false, log);
  return path;
}

const std::string& tiny_dir(const std::string& name) {
  static std::map<std::string, std::string> made;
  auto it = made.find(name);
  if (it == made.end()) {
    const std::string dir = scratch_dir(name);
    tiny_setup(dir, dir + "/data");
    it = made.emplace(name, dir).first;
  }
  return it->second;
}

namespace {
pid_t spawn(const std::vector<std::string>& args, const std::string& cwd,
            const std::string& out_path, const std::string& err_path,
            const std::vector<std::string>& extra_env = {}) {
  std::vector<std::string> full{mixdiff_binary()};
  full.insert(full.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : full) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addchdir_np(&fa, cwd.c_str());
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) env_strings.push_back(*e);
  env_strings.insert(env_strings.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data()) != 0) {
    throw std::runtime_error("cannot start " + full[0]);
  }
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}
}  // namespace

int spawn_mixdiff(const std::vector<std::string>& args, const std::string& out_path,
                  const std::string& err_path, const std::vector<std::string>& env) {
  return static_cast<int>(spawn(args, ".", out_path, err_path, env));
}

int wait_for(int pid) {
  int st = 0;
  waitpid(static_cast<pid_t>(pid), &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

CmdResult run_mixdiff(const std::vector<std::string>& args, const std::string& cwd,
                      const std::vector<std::string>& env) {
  static int counter = 0;
  const std::string dir = scratch_dir("cmd_" + std::to_string(counter++));
  const std::string out_path = dir + "/out", err_path = dir + "/err";
  CmdResult r;
  r.status = wait_for(static_cast<int>(spawn(args, cwd, out_path, err_path, env)));
  r.out = read_text(out_path);
  r.err = read_text(err_path);
  fs::remove_all(dir);
  return r;
}

int free_port() {
  static int next = 0;
  // Ask the kernel for a free port, then release it (a tiny race, fine for loopback tests).
  for (int attempt = 0; attempt < 50; ++attempt) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(20000 + (getpid() * 7 + next++ * 13) % 30000));
    const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    const int port = ntohs(a.sin_port);
    close(fd);
    if (ok) return port;
  }
  throw std::runtime_error("no free port found");
}

std::vector<std::string> lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  std::string l;
  while (std::getline(in, l)) {
    if (!l.empty()) out.push_back(l);
  }
  return out;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

std::string write_sweep(const std::string& dir, const std::string& body) {
  const std::string path = dir + "/sweep.yaml";
  write_text(path, "base: " + tiny_dir("sweep") + "/recipe.yaml\n" + body);
  return path;
}

}  // namespace mixdiff::test

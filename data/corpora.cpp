// Built-in corpora and tokenizer builders for `mixdiff data prepare`.
//
// The default corpora are free English text that Debian packages install offline
// (tools/setup.sh installs them):
//   kjv       King James Bible (public domain), package bible-kjv; one document per chapter.
//   fortunes  the `fortunes` package's quotation files (BSD-style notes per file); one document
//             per quotation. Backspace overstriking is removed and ASCII-art files are skipped.
//   wordnet   WordNet 3.0 glosses (WordNet licence, permissive), package wordnet-base; one
//             document per synset: "lemma, lemma: gloss; \"example\"".
//   text_files  the user's own UTF-8 files, split into documents by blank lines or per file.
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/errors.h"
#include "core/fs.h"
#include "data/prepare.h"
#include "data/tokenizer.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

// Drops control characters other than newline and tab, and resolves "c\bc" overstriking.
std::string clean_text(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (char ch : in) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c == '\b') {
      if (!out.empty()) out.pop_back();
      continue;
    }
    if (c < 0x20 && c != '\n' && c != '\t') continue;
    if (c == 0x7f) continue;
    out.push_back(ch);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  size_t start = 0;
  while (start < out.size() && (out[start] == '\n' || out[start] == ' ')) ++start;
  return out.substr(start);
}

class KjvCorpus : public Corpus {
 public:
  explicit KjvCorpus(const ConfigNode& cfg) : program_(cfg.get<std::string>("program", "bible")) {}

  void for_each_record(
      const std::function<void(std::string_view, const DocumentFields&)>& fn) const override {
    const DocumentFields f{{"corpus", "kjv"}};
    for_each_document([&](std::string_view d) { fn(d, f); });
  }

  void for_each_document(const std::function<void(std::string_view)>& fn) const override {
    // COLUMNS would make `bible -f` wrap lines; clear it.
    const std::string cmd = "env -u COLUMNS " + program_ + " -f 'gen1:1-rev22:21' 2>/dev/null";
    FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) throw DataError("corpus 'kjv': cannot run '" + program_ + "'");
    std::string chapter, doc, line;
    char buf[8192];
    int64_t verses = 0;
    while (std::fgets(buf, sizeof(buf), p)) {
      line += buf;
      if (line.empty() || line.back() != '\n') continue;
      line.pop_back();
      // "Ge1:1 In the beginning ..." -> chapter key "Ge1", text after the first space.
      const size_t sp = line.find(' '), colon = line.find(':');
      if (sp != std::string::npos && colon != std::string::npos && colon < sp) {
        const std::string key = line.substr(0, colon);
        if (key != chapter && !doc.empty()) {
          fn(doc);
          doc.clear();
        }
        chapter = key;
        doc += (doc.empty() ? "" : " ") + line.substr(sp + 1);
        ++verses;
      }
      line.clear();
    }
    const int status = ::pclose(p);
    if (!doc.empty()) fn(doc);
    if (verses == 0 || status != 0) {
      throw DataError("corpus 'kjv': '" + program_ +
                      "' printed no verses (install the Debian package bible-kjv; "
                      "tools/setup.sh does)");
    }
  }

 private:
  std::string program_;
};

class FortunesCorpus : public Corpus {
 public:
  explicit FortunesCorpus(const ConfigNode& cfg)
      : dir_(cfg.get<std::string>("dir", "/usr/share/games/fortunes")),
        exclude_(cfg.get<std::vector<std::string>>("exclude", {"ascii-art"})) {}

  void for_each_document(const std::function<void(std::string_view)>& fn) const override {
    if (!fs::is_directory(dir_)) {
      throw DataError("corpus 'fortunes': " + dir_ +
                      " not found (install the Debian package fortunes; tools/setup.sh does)");
    }
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(dir_)) {
      const std::string name = e.path().filename().string();
      if (e.is_symlink() || !e.is_regular_file() || e.path().has_extension()) continue;
      if (std::find(exclude_.begin(), exclude_.end(), name) != exclude_.end()) continue;
      files.push_back(e.path().string());
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) throw DataError("corpus 'fortunes': no fortune files in " + dir_);
    for (const auto& f : files) {
      std::ifstream in(f);
      std::string line, doc;
      while (std::getline(in, line)) {
        if (line == "%") {
          std::string d = clean_text(doc);
          if (!d.empty()) fn(d);
          doc.clear();
        } else {
          doc += line + "\n";
        }
      }
      std::string d = clean_text(doc);
      if (!d.empty()) fn(d);
    }
  }

 private:
  std::string dir_;
  std::vector<std::string> exclude_;
};

class WordnetCorpus : public Corpus {
 public:
  explicit WordnetCorpus(const ConfigNode& cfg)
      : dir_(cfg.get<std::string>("dir", "/usr/share/wordnet")) {}

  void for_each_document(const std::function<void(std::string_view)>& fn) const override {
    for_each_record([&](std::string_view d, const DocumentFields&) { fn(d); });
  }

  // Fields: corpus (wordnet), pos (noun, verb, adjective, adverb), lemmas (", "-separated), definition (the gloss before
  // its quoted examples).
  void for_each_record(
      const std::function<void(std::string_view, const DocumentFields&)>& fn) const override {
    int64_t n = 0;
    const char* parts[] = {"noun", "verb", "adj", "adv"};
    const char* pos_names[] = {"noun", "verb", "adjective", "adverb"};
    for (size_t p = 0; p < 4; ++p) {
      const std::string path = dir_ + "/data." + parts[p];
      std::ifstream in(path);
      if (!in) {
        throw DataError("corpus 'wordnet': " + path +
                        " not found (install the Debian package wordnet-base; tools/setup.sh "
                        "does)");
      }
      std::string line;
      while (std::getline(in, line)) {
        if (line.empty() || line[0] == ' ') continue;  // licence header lines start with spaces
        const size_t bar = line.find(" | ");
        if (bar == std::string::npos) continue;
        std::istringstream fields(line.substr(0, bar));
        std::string offset, lexfile, type, wcnt_hex;
        fields >> offset >> lexfile >> type >> wcnt_hex;
        int wcnt = 0;
        try {
          wcnt = std::stoi(wcnt_hex, nullptr, 16);
        } catch (...) {
          continue;
        }
        std::string lemmas;
        for (int w = 0; w < wcnt; ++w) {
          std::string word, lexid;
          fields >> word >> lexid;
          // Adjective markers such as "(a)" and underscores are notation, not text.
          const size_t paren = word.find('(');
          if (paren != std::string::npos) word = word.substr(0, paren);
          std::replace(word.begin(), word.end(), '_', ' ');
          lemmas += (lemmas.empty() ? "" : ", ") + word;
        }
        std::string gloss = line.substr(bar + 3);
        while (!gloss.empty() && gloss.back() == ' ') gloss.pop_back();
        std::string definition = gloss.substr(0, std::min(gloss.find("; \""), gloss.find(" \"")));
        while (!definition.empty() && (definition.back() == ' ' || definition.back() == ';')) {
          definition.pop_back();
        }
        fn(lemmas + ": " + gloss, {{"corpus", "wordnet"},
                                   {"pos", pos_names[p]},
                                   {"lemmas", lemmas},
                                   {"definition", definition}});
        ++n;
      }
    }
    if (n == 0) throw DataError("corpus 'wordnet': no synsets found under " + dir_);
  }

 private:
  std::string dir_;
};

class TextFilesCorpus : public Corpus {
 public:
  explicit TextFilesCorpus(const ConfigNode& cfg)
      : paths_(cfg.get<std::vector<std::string>>("paths")),
        split_(cfg.get<std::string>("split", "paragraph")) {
    if (paths_.empty()) cfg.fail("paths", "expected at least one file");
    if (split_ != "paragraph" && split_ != "file" && split_ != "line") {
      cfg.fail("split", "expected one of paragraph, file, line, got '" + split_ + "'");
    }
  }

  void for_each_document(const std::function<void(std::string_view)>& fn) const override {
    for (const auto& p : paths_) {
      const std::string text = read_file(p, "text corpus file");
      if (split_ == "file") {
        std::string d = clean_text(text);
        if (!d.empty()) fn(d);
        continue;
      }
      std::istringstream in(text);
      std::string line, doc;
      auto flush = [&] {
        std::string d = clean_text(doc);
        if (!d.empty()) fn(d);
        doc.clear();
      };
      while (std::getline(in, line)) {
        if (split_ == "line") {
          doc = line;
          flush();
        } else if (line.find_first_not_of(" \t\r") == std::string::npos) {
          flush();
        } else {
          doc += line + "\n";
        }
      }
      flush();
    }
  }

 private:
  std::vector<std::string> paths_;
  std::string split_;
};

MIXDIFF_REGISTER(corpora_registry(), "kjv",
                 "King James Bible via the `bible` program (Debian bible-kjv); keys: program",
                 [](const ConfigNode& c) -> std::unique_ptr<Corpus> {
                   return std::make_unique<KjvCorpus>(c);
                 });
MIXDIFF_REGISTER(corpora_registry(), "fortunes",
                 "quotations from Debian's fortunes package; keys: dir, exclude",
                 [](const ConfigNode& c) -> std::unique_ptr<Corpus> {
                   return std::make_unique<FortunesCorpus>(c);
                 });
MIXDIFF_REGISTER(corpora_registry(), "wordnet",
                 "WordNet 3.0 glosses with their lemmas (Debian wordnet-base); keys: dir",
                 [](const ConfigNode& c) -> std::unique_ptr<Corpus> {
                   return std::make_unique<WordnetCorpus>(c);
                 });
MIXDIFF_REGISTER(corpora_registry(), "text_files",
                 "your own UTF-8 text files; keys: paths, split (paragraph|file|line)",
                 [](const ConfigNode& c) -> std::unique_ptr<Corpus> {
                   return std::make_unique<TextFilesCorpus>(c);
                 });

// ---- tokenizer builders -------------------------------------------------------------------

class ByteBpeBuilder : public TokenizerBuilder {
 public:
  explicit ByteBpeBuilder(const ConfigNode& cfg)
      : vocab_size_(cfg.get<int64_t>("vocab_size")),
        min_frequency_(cfg.get<int64_t>("min_frequency", 2)) {
    if (vocab_size_ < 258 || vocab_size_ > 65536) {
      cfg.fail("vocab_size", str("expected 258..65536 (256 bytes + merges + EOS), got ",
                                 vocab_size_));
    }
  }
  bool wants_text() const override { return true; }
  void add_text(std::string_view t) override { trainer_.add_text(t); }
  Tokenizer build() override {
    return Tokenizer("byte_bpe",
                     trainer_.train(static_cast<int32_t>(vocab_size_), "<|endoftext|>",
                                    min_frequency_));
  }

 private:
  int64_t vocab_size_;
  int64_t min_frequency_;
  BpeTrainer trainer_;
};

class Gpt2FilesBuilder : public TokenizerBuilder {
 public:
  explicit Gpt2FilesBuilder(const ConfigNode& cfg)
      : dir_(cfg.get<std::string>("dir")),
        encoder_(cfg.get<std::string>("encoder", "encoder.json")),
        merges_(cfg.get<std::string>("merges", "vocab.bpe")),
        eos_(cfg.get<std::string>("eos", "<|endoftext|>")) {}
  Tokenizer build() override {
    return Tokenizer("gpt2", ByteLevelBpe::from_files(dir_ + "/" + encoder_, dir_ + "/" + merges_,
                                                      eos_));
  }

 private:
  std::string dir_, encoder_, merges_, eos_;
};

class FolderBuilder : public TokenizerBuilder {
 public:
  explicit FolderBuilder(const ConfigNode& cfg) : dir_(cfg.get<std::string>("dir")) {}
  Tokenizer build() override { return Tokenizer::load(dir_); }

 private:
  std::string dir_;
};

MIXDIFF_REGISTER(tokenizer_builders(), "byte_bpe",
                 "byte-level BPE trained on the training split; keys: vocab_size, min_frequency",
                 [](const ConfigNode& c) -> std::unique_ptr<TokenizerBuilder> {
                   return std::make_unique<ByteBpeBuilder>(c);
                 });
MIXDIFF_REGISTER(tokenizer_builders(), "gpt2",
                 "GPT-2 style encoder.json + vocab.bpe from a folder; keys: dir, encoder, merges, "
                 "eos",
                 [](const ConfigNode& c) -> std::unique_ptr<TokenizerBuilder> {
                   return std::make_unique<Gpt2FilesBuilder>(c);
                 });
MIXDIFF_REGISTER(tokenizer_builders(), "folder",
                 "a MixDiff tokenizer folder (tokenizer.json + encoder.json + vocab.bpe), e.g. "
                 "the one import-hf writes; keys: dir",
                 [](const ConfigNode& c) -> std::unique_ptr<TokenizerBuilder> {
                   return std::make_unique<FolderBuilder>(c);
                 });

}  // namespace
}  // namespace mixdiff

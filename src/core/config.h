// Strict recipe reader.
//
// A ConfigNode is a view of one node of a YAML tree plus its dotted key path ("model.n_layer",
// "losses.0.weight"). Every read is recorded; after all components were built from a recipe,
// `check_unknown_keys()` rejects any key that nobody read, naming file, line, key path and the
// keys that are known at that level. Reads are typed and strict: an integer key does not accept
// "3.5" or "four", a boolean only true/false. Defaults used for absent keys are written back into
// the tree, so `to_yaml()` yields the fully resolved recipe, which reads back to the same values.
// `--set key.path=value` overrides edit the same tree before anything is built and go through the
// same checks; errors about them name the override instead of a file line.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace mixdiff {

/// `yaml` re-emitted in one form whatever its layout: map keys sorted, every collection in flow
/// style, scalars as their text (quotes dropped), comments gone. Two texts that spell the same
/// tree give the same string. Throws ConfigError on a YAML syntax error.
std::string canonical_yaml(const std::string& yaml);

class ConfigNode {
 public:
  /// Parses a YAML file. Throws ConfigError for a missing file or a YAML syntax error (with line).
  static ConfigNode from_file(const std::string& path);
  /// Parses YAML text; `source` names it in messages (a file name or "<string>").
  static ConfigNode from_string(const std::string& text, const std::string& source);

  ConfigNode(const ConfigNode&);
  ConfigNode& operator=(const ConfigNode&);
  ~ConfigNode();

  /// Applies "a.b.c=value" (value parsed as YAML). Only valid on the root node.
  void apply_override(const std::string& assignment);

  /// Whether `key` is present with a non-null value. Marks the key as known.
  bool has(const std::string& key) const;
  /// Required child map/sequence/scalar.
  ConfigNode at(const std::string& key) const;
  /// Child map, created empty when absent (for optional sections such as `eval`).
  ConfigNode section(const std::string& key) const;

  /// Required typed values.
  template <class T>
  T get(const std::string& key) const;
  /// Optional typed value: `def` is used (and written into the tree) when the key is absent.
  template <class T>
  T get(const std::string& key, const T& def) const;
  /// Optional value that may be null: absent or `null` gives nullopt (written back as null).
  template <class T>
  std::optional<T> get_optional(const std::string& key) const;

  /// A name read once into an enum (like LibTorch's kFloat options): `choices` maps each accepted
  /// name to its value; absent gives `def` (written back by name); any other name fails with the
  /// accepted ones listed.
  template <class E>
  E get_choice(const std::string& key, const std::vector<std::pair<std::string, E>>& choices,
               E def) const {
    std::string def_name, names;
    for (const auto& [n, v] : choices) {
      if (v == def) def_name = n;
      names += (names.empty() ? "" : ", ") + n;
    }
    const std::string got = get<std::string>(key, def_name);
    for (const auto& [n, v] : choices) {
      if (n == got) return v;
    }
    fail(key, "expected one of " + names + ", got '" + got + "'");
  }

  /// This node's own scalar value, typed.
  template <class T>
  T as() const;

  bool is_map() const;
  bool is_sequence() const;
  bool is_scalar() const;
  bool is_null() const;
  size_t size() const;                       ///< number of elements of a sequence
  ConfigNode operator[](size_t index) const; ///< element of a sequence
  std::vector<std::string> keys() const;     ///< keys of a map, in file order (not marked read)

  /// Dotted key path of this node ("" for the root).
  const std::string& path() const { return path_; }
  /// "file:line:col" or "--set a.b=1" for where this node (or `key` under it) came from.
  std::string where(const std::string& key = "") const;
  /// Throws ConfigError "<where>: <path.key>: <msg>".
  [[noreturn]] void fail(const std::string& key, const std::string& msg) const;

  /// Throws ConfigError for the first key below this node that was never read.
  void check_unknown_keys() const;
  /// Throws ConfigError for an override whose key was never read (for commands that read only
  /// part of a recipe, such as `generate`).
  void check_overrides_used() const;
  /// Sets a value (used for derived keys such as model.vocab_size taken from the data).
  template <class T>
  void set(const std::string& key, const T& value) const;
  /// The tree below this node as YAML text.
  std::string to_yaml() const;
  /// Deep copy of the tree (no shared state, read marks cleared).
  ConfigNode clone() const;

 private:
  struct Root;
  ConfigNode(std::shared_ptr<Root> root, std::unique_ptr<YAML::Node> node, std::string path);
  std::string child_path(const std::string& key) const;
  YAML::Node lookup(const std::string& key) const;
  void mark(const std::string& key) const;

  std::shared_ptr<Root> root_;
  std::unique_ptr<YAML::Node> node_;
  std::string path_;
};

/// Shortest decimal text that reads back to exactly `v` ("0.0003", "1e-08").
std::string format_double(double v);

}  // namespace mixdiff

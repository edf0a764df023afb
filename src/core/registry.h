// A name -> factory table per extension point (models, routers, losses, ...).
//
// Rules (style.md guideline 2): unknown name -> ConfigError listing the known names; duplicate
// name -> std::logic_error at start-up; factories never return null. Registries are function-local
// statics (see the `*_registry()` accessors next to each interface), so the order in which
// translation units initialise does not matter. Registering TUs live in the `mixdiff_components`
// library, which is linked WHOLE_ARCHIVE so that the linker keeps them.
#pragma once

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/errors.h"

namespace mixdiff {

/// One line of `mixdiff inspect`: a registry's entries with their help strings.
struct RegistryListing {
  std::string kind;
  std::string help;
  std::vector<std::pair<std::string, std::string>> entries;  // (name, help), sorted
};

template <class Product, class... Args>
class Registry {
 public:
  using Factory = std::function<Product(Args...)>;

  Registry(std::string kind, std::string help) : kind_(std::move(kind)), help_(std::move(help)) {}

  /// Adds `name`; throws std::logic_error on a duplicate (a programming error, seen at start-up).
  bool add(const std::string& name, Factory factory, std::string help) {
    if (entries_.count(name)) {
      throw std::logic_error(str("registry '", kind_, "': duplicate name '", name, "'"));
    }
    entries_.emplace(name, Entry{std::move(factory), std::move(help)});
    return true;
  }

  /// Builds `name`. `where` names the recipe key for the error message (e.g. "model.kind").
  Product create(const std::string& name, const std::string& where, Args... args) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      throw ConfigError(str(where.empty() ? "" : where + ": ", "unknown ", kind_, " '", name,
                            "' (known: ", joined_names(), ")"));
    }
    return it->second.factory(std::forward<Args>(args)...);
  }

  bool contains(const std::string& name) const { return entries_.count(name) > 0; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& kv : entries_) out.push_back(kv.first);
    return out;  // std::map keeps them sorted
  }

  std::string joined_names() const {
    std::string s;
    for (const auto& kv : entries_) s += (s.empty() ? "" : ", ") + kv.first;
    return s.empty() ? "none registered" : s;
  }

  const std::string& kind() const { return kind_; }

  RegistryListing listing() const {
    RegistryListing l{kind_, help_, {}};
    for (const auto& kv : entries_) l.entries.emplace_back(kv.first, kv.second.help);
    return l;
  }

 private:
  struct Entry {
    Factory factory;
    std::string help;
  };
  std::string kind_;
  std::string help_;
  std::map<std::string, Entry> entries_;
};

/// The entry that `node`'s key `key` names (default `def`), built with `args`. An unknown name
/// fails through node.fail (the recipe position of the key) with the known names. `Node` is
/// ConfigNode (a template parameter, so that this header needs no recipe reader).
template <class Node, class Product, class... Args, class... Given>
Product create_named(const Registry<Product, Args...>& r, const Node& node, const std::string& key,
                     const std::string& def, Given&&... args) {
  const std::string name = node.template get<std::string>(key, def);
  if (!r.contains(name)) {
    node.fail(key, "unknown '" + name + "' (" + r.kind() + ": " + r.joined_names() + ")");
  }
  return r.create(name, node.path().empty() ? key : node.path() + "." + key,
                  std::forward<Given>(args)...);
}

}  // namespace mixdiff

#define MIXDIFF_CONCAT_INNER(a, b) a##b
#define MIXDIFF_CONCAT(a, b) MIXDIFF_CONCAT_INNER(a, b)

/// MIXDIFF_REGISTER(models_registry(), "dense_dlm", "help text", factory_lambda);
#define MIXDIFF_REGISTER(registry, name, help, ...)                                \
  static const bool MIXDIFF_CONCAT(mixdiff_registered_, __COUNTER__) [[maybe_unused]] = \
      (registry).add(name, __VA_ARGS__, help)

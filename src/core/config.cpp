#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "core/errors.h"

namespace mixdiff {

struct ConfigNode::Root {
  std::string source;                          // file name or "<string>"
  std::map<std::string, std::string> overrides;  // dotted path -> "--set ..." text
  std::set<std::string> read;                  // dotted paths that were read
};

namespace {

std::string describe_scalar(const YAML::Node& n) {
  if (!n.IsDefined() || n.IsNull()) return "null";
  if (n.IsMap()) return "a map";
  if (n.IsSequence()) return "a list";
  return "'" + n.Scalar() + "'";
}

bool is_integer_text(const std::string& s) {
  size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
  if (i >= s.size()) return false;
  for (; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
  }
  return true;
}

std::vector<std::string> split_path(const std::string& dotted) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : dotted) {
    if (c == '.') {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

// Typed conversion of a scalar; returns an error text (empty on success).
template <class T>
struct Convert;

template <>
struct Convert<int64_t> {
  static std::string expected() { return "an integer"; }
  static bool from(const YAML::Node& n, int64_t* out) {
    if (!n.IsScalar() || !is_integer_text(n.Scalar())) return false;
    errno = 0;
    long long v = std::strtoll(n.Scalar().c_str(), nullptr, 10);
    if (errno == ERANGE) return false;
    *out = v;
    return true;
  }
  static YAML::Node to(int64_t v) { return YAML::Node(std::to_string(v)); }
};

template <>
struct Convert<int> {
  static std::string expected() { return "an integer"; }
  static bool from(const YAML::Node& n, int* out) {
    int64_t v = 0;
    if (!Convert<int64_t>::from(n, &v) || v < INT32_MIN || v > INT32_MAX) return false;
    *out = static_cast<int>(v);
    return true;
  }
  static YAML::Node to(int v) { return YAML::Node(std::to_string(v)); }
};

template <>
struct Convert<double> {
  static std::string expected() { return "a number"; }
  static bool from(const YAML::Node& n, double* out) {
    if (!n.IsScalar()) return false;
    const std::string& s = n.Scalar();
    if (s == ".inf" || s == "+.inf" || s == "inf") {
      *out = INFINITY;
      return true;
    }
    if (s == "-.inf" || s == "-inf") {
      *out = -INFINITY;
      return true;
    }
    if (s.empty()) return false;
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(s.c_str(), &end);
    if (end != s.c_str() + s.size() || errno == ERANGE || std::isnan(v)) return false;
    *out = v;
    return true;
  }
  static YAML::Node to(double v) { return YAML::Node(format_double(v)); }
};

template <>
struct Convert<bool> {
  static std::string expected() { return "true or false"; }
  static bool from(const YAML::Node& n, bool* out) {
    if (!n.IsScalar()) return false;
    const std::string& s = n.Scalar();
    if (s == "true" || s == "True") {
      *out = true;
      return true;
    }
    if (s == "false" || s == "False") {
      *out = false;
      return true;
    }
    return false;
  }
  static YAML::Node to(bool v) { return YAML::Node(v ? "true" : "false"); }
};

template <>
struct Convert<std::string> {
  static std::string expected() { return "a string"; }
  static bool from(const YAML::Node& n, std::string* out) {
    if (!n.IsScalar()) return false;
    *out = n.Scalar();
    return true;
  }
  static YAML::Node to(const std::string& v) { return YAML::Node(v); }
};

template <class E>
struct Convert<std::vector<E>> {
  static std::string expected() { return "a list of " + Convert<E>::expected().substr(2) + "s"; }
  static bool from(const YAML::Node& n, std::vector<E>* out) {
    if (!n.IsSequence()) return false;
    out->clear();
    for (size_t i = 0; i < n.size(); ++i) {
      E e{};
      if (!Convert<E>::from(n[i], &e)) return false;
      out->push_back(e);
    }
    return true;
  }
  static YAML::Node to(const std::vector<E>& v) {
    YAML::Node n(YAML::NodeType::Sequence);
    n.SetStyle(YAML::EmitterStyle::Flow);
    for (const auto& e : v) n.push_back(Convert<E>::to(e));
    return n;
  }
};

YAML::Node deep_copy(const YAML::Node& n) {
  return YAML::Load(YAML::Dump(n));
}

}  // namespace

std::string format_double(double v) {
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  char buf[64];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf);
  // Keep it a float in YAML's eyes (and to a human): "1" -> "1.0", but leave "1e-08" alone.
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

ConfigNode::ConfigNode(std::shared_ptr<Root> root, std::unique_ptr<YAML::Node> node,
                       std::string path)
    : root_(std::move(root)), node_(std::move(node)), path_(std::move(path)) {}

ConfigNode::ConfigNode(const ConfigNode& o)
    : root_(o.root_), node_(std::make_unique<YAML::Node>(*o.node_)), path_(o.path_) {}

ConfigNode& ConfigNode::operator=(const ConfigNode& o) {
  if (this != &o) {
    root_ = o.root_;
    node_ = std::make_unique<YAML::Node>(*o.node_);
    path_ = o.path_;
  }
  return *this;
}

ConfigNode::~ConfigNode() = default;

ConfigNode ConfigNode::from_string(const std::string& text, const std::string& source) {
  YAML::Node n;
  try {
    n = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw ConfigError(str(source, ":", e.mark.line + 1, ":", e.mark.column + 1,
                          ": YAML syntax error: ", e.msg));
  }
  if (n.IsNull() || !n.IsDefined()) n = YAML::Node(YAML::NodeType::Map);
  if (!n.IsMap()) {
    throw ConfigError(str(source, ": expected a map of keys at the top level, got ",
                          describe_scalar(n)));
  }
  auto root = std::make_shared<Root>();
  root->source = source;
  return ConfigNode(root, std::make_unique<YAML::Node>(n), "");
}

ConfigNode ConfigNode::from_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ConfigError(str(path, ": cannot open recipe file (expected a YAML file)"));
  std::stringstream ss;
  ss << f.rdbuf();
  return from_string(ss.str(), path);
}

ConfigNode ConfigNode::clone() const {
  auto root = std::make_shared<Root>();
  root->source = root_->source;
  root->overrides = root_->overrides;
  return ConfigNode(root, std::make_unique<YAML::Node>(deep_copy(*node_)), path_);
}

std::string ConfigNode::child_path(const std::string& key) const {
  return path_.empty() ? key : path_ + "." + key;
}

void ConfigNode::mark(const std::string& key) const { root_->read.insert(child_path(key)); }

YAML::Node ConfigNode::lookup(const std::string& key) const {
  const YAML::Node& cn = *node_;
  if (!cn.IsMap()) return YAML::Node(YAML::NodeType::Undefined);
  return cn[key];
}

std::string ConfigNode::where(const std::string& key) const {
  // An override on this path or a parent of it wins: it replaced whatever the file said.
  std::string p = key.empty() ? path_ : child_path(key);
  for (;;) {
    auto it = root_->overrides.find(p);
    if (it != root_->overrides.end()) return it->second;
    size_t dot = p.rfind('.');
    if (dot == std::string::npos) break;
    p = p.substr(0, dot);
  }
  // Assigning to an undefined yaml-cpp node throws, so pick the node without reassigning.
  const YAML::Node child = key.empty() ? *node_ : lookup(key);
  const YAML::Mark m = child.IsDefined() ? child.Mark() : node_->Mark();
  if (m.is_null()) return root_->source;
  return str(root_->source, ":", m.line + 1, ":", m.column + 1);
}

void ConfigNode::fail(const std::string& key, const std::string& msg) const {
  std::string p = key.empty() ? path_ : child_path(key);
  throw ConfigError(str(where(key), ": ", p.empty() ? "" : p + ": ", msg));
}

bool ConfigNode::has(const std::string& key) const {
  mark(key);
  YAML::Node n = lookup(key);
  return n.IsDefined() && !n.IsNull();
}

ConfigNode ConfigNode::at(const std::string& key) const {
  if (!is_map()) fail("", str("expected a map, got ", describe_scalar(*node_)));
  mark(key);
  YAML::Node n = lookup(key);
  if (!n.IsDefined() || n.IsNull()) fail("", str("missing required key '", key, "'"));
  return ConfigNode(root_, std::make_unique<YAML::Node>(n), child_path(key));
}

ConfigNode ConfigNode::section(const std::string& key) const {
  if (!is_map()) fail("", str("expected a map, got ", describe_scalar(*node_)));
  mark(key);
  const YAML::Node existing = lookup(key);
  if (!existing.IsDefined() || existing.IsNull()) {
    (*node_)[key] = YAML::Node(YAML::NodeType::Map);
  }
  const YAML::Node n = lookup(key);
  if (!n.IsMap()) fail(key, str("expected a map, got ", describe_scalar(n)));
  return ConfigNode(root_, std::make_unique<YAML::Node>(n), child_path(key));
}

template <class T>
T ConfigNode::get(const std::string& key) const {
  if (!is_map()) fail("", str("expected a map, got ", describe_scalar(*node_)));
  mark(key);
  YAML::Node n = lookup(key);
  if (!n.IsDefined() || n.IsNull()) fail("", str("missing required key '", key, "'"));
  T out{};
  if (!Convert<T>::from(n, &out)) {
    fail(key, str("expected ", Convert<T>::expected(), ", got ", describe_scalar(n)));
  }
  return out;
}

template <class T>
T ConfigNode::get(const std::string& key, const T& def) const {
  if (!is_map()) fail("", str("expected a map, got ", describe_scalar(*node_)));
  mark(key);
  YAML::Node n = lookup(key);
  if (!n.IsDefined() || n.IsNull()) {
    (*node_)[key] = Convert<T>::to(def);
    return def;
  }
  T out{};
  if (!Convert<T>::from(n, &out)) {
    fail(key, str("expected ", Convert<T>::expected(), ", got ", describe_scalar(n)));
  }
  return out;
}

template <class T>
std::optional<T> ConfigNode::get_optional(const std::string& key) const {
  if (!is_map()) fail("", str("expected a map, got ", describe_scalar(*node_)));
  mark(key);
  YAML::Node n = lookup(key);
  if (!n.IsDefined() || n.IsNull()) {
    (*node_)[key] = YAML::Node(YAML::NodeType::Null);
    return std::nullopt;
  }
  T out{};
  if (!Convert<T>::from(n, &out)) {
    fail(key, str("expected ", Convert<T>::expected(), " or null, got ", describe_scalar(n)));
  }
  return out;
}

template <class T>
T ConfigNode::as() const {
  T out{};
  if (!Convert<T>::from(*node_, &out)) {
    fail("", str("expected ", Convert<T>::expected(), ", got ", describe_scalar(*node_)));
  }
  return out;
}

template <class T>
void ConfigNode::set(const std::string& key, const T& value) const {
  (*node_)[key] = Convert<T>::to(value);
  mark(key);
}

bool ConfigNode::is_map() const { return node_->IsMap(); }
bool ConfigNode::is_sequence() const { return node_->IsSequence(); }
bool ConfigNode::is_scalar() const { return node_->IsScalar(); }
bool ConfigNode::is_null() const { return !node_->IsDefined() || node_->IsNull(); }
size_t ConfigNode::size() const { return node_->IsSequence() ? node_->size() : 0; }

ConfigNode ConfigNode::operator[](size_t index) const {
  if (!is_sequence()) fail("", str("expected a list, got ", describe_scalar(*node_)));
  if (index >= node_->size()) fail("", str("index ", index, " out of range (", size(), ")"));
  std::string key = std::to_string(index);
  mark(key);
  const YAML::Node& cn = *node_;
  return ConfigNode(root_, std::make_unique<YAML::Node>(cn[index]), child_path(key));
}

std::vector<std::string> ConfigNode::keys() const {
  std::vector<std::string> out;
  if (!is_map()) return out;
  for (auto it = node_->begin(); it != node_->end(); ++it) out.push_back(it->first.Scalar());
  return out;
}

void ConfigNode::check_unknown_keys() const {
  if (is_map()) {
    for (auto it = node_->begin(); it != node_->end(); ++it) {
      const std::string key = it->first.Scalar();
      const std::string p = child_path(key);
      if (!root_->read.count(p)) {
        std::string known;
        const std::string prefix = path_.empty() ? "" : path_ + ".";
        for (const auto& r : root_->read) {
          if (r.compare(0, prefix.size(), prefix) != 0) continue;
          std::string rest = r.substr(prefix.size());
          if (rest.find('.') != std::string::npos || rest.empty()) continue;
          known += (known.empty() ? "" : ", ") + rest;
        }
        // Point at the key itself, not at its value.
        std::string at = where(key);
        const YAML::Mark km = it->first.Mark();
        if (at.rfind("--set ", 0) != 0 && !km.is_null()) {
          at = str(root_->source, ":", km.line + 1, ":", km.column + 1);
        }
        throw ConfigError(str(at, ": ", p, ": unknown key '", key, "'",
                              known.empty() ? std::string(" (this section takes no keys)")
                                            : str(" (known: ", known, ")")));
      }
      ConfigNode(root_, std::make_unique<YAML::Node>(it->second), p).check_unknown_keys();
    }
  } else if (is_sequence()) {
    const YAML::Node& cn = *node_;
    for (size_t i = 0; i < cn.size(); ++i) {
      if (!cn[i].IsMap()) continue;  // lists of scalars are read as a whole
      std::string p = child_path(std::to_string(i));
      if (!root_->read.count(p)) continue;  // the list was read as a value
      ConfigNode(root_, std::make_unique<YAML::Node>(cn[i]), p).check_unknown_keys();
    }
  }
}

void ConfigNode::check_overrides_used() const {
  for (const auto& [key, shown] : root_->overrides) {
    bool used = root_->read.count(key) > 0;
    for (auto it = root_->read.lower_bound(key + "."); !used && it != root_->read.end(); ++it) {
      used = it->compare(0, key.size() + 1, key + ".") == 0;
      break;
    }
    if (!used) throw ConfigError(str(shown, ": unknown key '", key, "' (not used by this command)"));
  }
}

void ConfigNode::apply_override(const std::string& assignment) {
  const std::string shown = "--set " + assignment;
  size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw ConfigError(str(shown, ": expected key.path=value"));
  }
  const std::string key = assignment.substr(0, eq);
  const std::string text = assignment.substr(eq + 1);
  YAML::Node value;
  try {
    value = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw ConfigError(str(shown, ": value is not valid YAML: ", e.msg));
  }
  if (!value.IsDefined()) value = YAML::Node(YAML::NodeType::Null);
  std::vector<std::string> parts = split_path(key);
  YAML::Node cur = *node_;
  std::string sofar;
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string& part = parts[i];
    if (part.empty()) throw ConfigError(str(shown, ": empty key segment in '", key, "'"));
    const bool last = i + 1 == parts.size();
    if (cur.IsSequence()) {
      if (!is_integer_text(part)) {
        throw ConfigError(str(shown, ": '", sofar, "' is a list; expected an index, got '", part,
                              "'"));
      }
      // Found by fuzzing: an index past 2^64 made std::stoul throw out_of_range.
      if (part.size() > 9 || std::stoul(part) >= cur.size()) {
        throw ConfigError(str(shown, ": index ", part, " out of range for '", sofar, "' (",
                              cur.size(), " items)"));
      }
      const size_t idx = std::stoul(part);
      if (last) {
        cur[idx] = value;
      } else {
        YAML::Node next = cur[idx];
        cur.reset(next);
      }
    } else {
      if (cur.IsScalar()) {
        throw ConfigError(str(shown, ": '", sofar, "' is a value, not a map"));
      }
      if (last) {
        cur[part] = value;
      } else {
        const YAML::Node& ccur = cur;
        if (!ccur[part].IsDefined() || ccur[part].IsNull()) {
          cur[part] = YAML::Node(YAML::NodeType::Map);
        }
        YAML::Node next = cur[part];
        cur.reset(next);
      }
    }
    sofar += (sofar.empty() ? "" : ".") + part;
  }
  root_->overrides[key] = shown;
}

namespace {
/// A string as it reads back from a flow collection it was written into.
std::string written_back(const std::string& s) {
  YAML::Emitter e;
  e << YAML::Flow << YAML::BeginSeq << s << YAML::EndSeq;
  try {
    const YAML::Node n = YAML::Load(e.c_str());
    if (n.IsSequence() && n.size() == 1 && n[0].IsScalar()) return n[0].Scalar();
  } catch (const YAML::Exception&) {
  }
  return s;
}

YAML::Node canonical_node(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: {
      // Keys as they read back after being written out (bytes that are not UTF-8 come out
      // replaced), so that a second pass sorts them the same way. Sorted through indices:
      // assigning a YAML::Node (as std::sort would) rebinds the node it refers to.
      std::vector<std::string> keys;
      std::vector<YAML::Node> values;
      for (const auto& kv : n) {
        keys.push_back(written_back(kv.first.IsScalar() ? kv.first.Scalar() : YAML::Dump(kv.first)));
        values.push_back(kv.second);
      }
      std::vector<size_t> order(keys.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return keys[a] < keys[b]; });
      YAML::Node out(YAML::NodeType::Map);
      out.SetStyle(YAML::EmitterStyle::Flow);
      for (size_t i : order) out[keys[i]] = canonical_node(values[i]);
      return out;
    }
    case YAML::NodeType::Sequence: {
      YAML::Node out(YAML::NodeType::Sequence);
      out.SetStyle(YAML::EmitterStyle::Flow);
      for (const auto& e : n) out.push_back(canonical_node(e));
      return out;
    }
    case YAML::NodeType::Scalar:
      return YAML::Node(n.Scalar());
    default:
      return YAML::Node();
  }
}
}  // namespace

std::string canonical_yaml(const std::string& yaml) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    throw ConfigError(str("invalid YAML (line ", e.mark.line + 1, "): ", e.msg));
  }
  YAML::Emitter out;
  out << canonical_node(root);
  return std::string(out.c_str()) + "\n";
}

std::string ConfigNode::to_yaml() const {
  YAML::Emitter out;
  out << *node_;
  return std::string(out.c_str()) + "\n";
}

#define MIXDIFF_CONFIG_INSTANTIATE(T)                                                 \
  template T ConfigNode::get<T>(const std::string&) const;                            \
  template T ConfigNode::get<T>(const std::string&, const T&) const;                  \
  template std::optional<T> ConfigNode::get_optional<T>(const std::string&) const;    \
  template T ConfigNode::as<T>() const;                                               \
  template void ConfigNode::set<T>(const std::string&, const T&) const;

MIXDIFF_CONFIG_INSTANTIATE(int64_t)
MIXDIFF_CONFIG_INSTANTIATE(int)
MIXDIFF_CONFIG_INSTANTIATE(double)
MIXDIFF_CONFIG_INSTANTIATE(bool)
MIXDIFF_CONFIG_INSTANTIATE(std::string)
MIXDIFF_CONFIG_INSTANTIATE(std::vector<int64_t>)
MIXDIFF_CONFIG_INSTANTIATE(std::vector<double>)
MIXDIFF_CONFIG_INSTANTIATE(std::vector<std::string>)

}  // namespace mixdiff

#include "sweep/sweep.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <set>

#include "core/config.h"
#include "core/errors.h"

namespace mixdiff {

namespace fs = std::filesystem;

std::string yaml_flow(const std::string& text) {
  YAML::Node n = YAML::Load(text);
  YAML::Emitter e;
  e.SetMapFormat(YAML::Flow);
  e.SetSeqFormat(YAML::Flow);
  e << n;
  return e.c_str();
}

namespace {

struct Point {
  std::vector<std::pair<std::string, std::string>> overrides;
  std::map<std::string, std::string> values;
  std::vector<std::string> labels;
};

void only_keys(const ConfigNode& n, const std::set<std::string>& allowed) {
  for (const auto& k : n.keys()) {
    if (!allowed.count(k)) {
      std::string known;
      for (const auto& a : allowed) known += (known.empty() ? "" : ", ") + a;
      n.fail(k, "unknown key (known: " + known + ")");
    }
  }
}

std::string value_of(const ConfigNode& map, const std::string& key) {
  return yaml_flow(map.at(key).to_yaml());
}

/// Points of one axis item: {grid: {...}} | {zip: {...}} | {list: [...]}.
std::vector<Point> expand_axis(const ConfigNode& axis) {
  if (!axis.is_map() || axis.keys().size() != 1) {
    axis.fail("", "expected one of {grid: {...}}, {zip: {...}}, {list: [...]}");
  }
  const std::string kind = axis.keys().front();
  only_keys(axis, {"grid", "zip", "list"});
  ConfigNode body = axis.at(kind);
  std::vector<Point> pts;
  if (kind == "list") {
    if (!body.is_sequence() || body.size() == 0) axis.fail(kind, "expected a non-empty list");
    for (size_t i = 0; i < body.size(); ++i) {
      ConfigNode item = body[i];
      if (!item.is_map()) item.fail("", "expected {label: NAME, set: {key: value, ...}}");
      only_keys(item, {"label", "set"});
      Point p;
      if (item.has("label")) p.labels.push_back(item.get<std::string>("label"));
      ConfigNode set = item.at("set");
      if (!set.is_map()) item.fail("set", "expected a map of dotted keys to values");
      for (const auto& k : set.keys()) {
        const std::string v = value_of(set, k);
        p.overrides.emplace_back(k, v);
        p.values[k] = v;
      }
      pts.push_back(std::move(p));
    }
    return pts;
  }
  if (!body.is_map() || body.keys().empty()) axis.fail(kind, "expected a map of keys to lists");
  std::vector<std::pair<std::string, std::vector<std::string>>> lists;
  for (const auto& k : body.keys()) {
    ConfigNode l = body.at(k);
    if (!l.is_sequence() || l.size() == 0) body.fail(k, "expected a non-empty list of values");
    std::vector<std::string> vals;
    for (size_t i = 0; i < l.size(); ++i) vals.push_back(yaml_flow(l[i].to_yaml()));
    lists.emplace_back(k, std::move(vals));
  }
  if (kind == "zip") {
    const size_t n = lists.front().second.size();
    for (const auto& [k, v] : lists) {
      if (v.size() != n) {
        body.fail(k, str("has ", v.size(), " values, but '", lists.front().first, "' has ", n,
                         " (zipped lists must have equal lengths)"));
      }
    }
    for (size_t i = 0; i < n; ++i) {
      Point p;
      for (const auto& [k, v] : lists) {
        p.overrides.emplace_back(k, v[i]);
        p.values[k] = v[i];
      }
      pts.push_back(std::move(p));
    }
    return pts;
  }
  pts.push_back(Point{});
  for (const auto& [k, vals] : lists) {  // grid: product, first key outermost
    std::vector<Point> next;
    for (const auto& p : pts) {
      for (const auto& v : vals) {
        Point q = p;
        q.overrides.emplace_back(k, v);
        q.values[k] = v;
        next.push_back(std::move(q));
      }
    }
    pts = std::move(next);
  }
  return pts;
}

std::string sanitize(const std::string& s, size_t max_len = 120) {
  std::string o;
  for (char c : s) {
    const bool ok = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-';
    if (ok) {
      o += c;
    } else if (!o.empty() && o.back() != '_') {
      o += '_';
    }
  }
  while (!o.empty() && o.back() == '_') o.pop_back();
  return o.substr(0, max_len);
}

}  // namespace

SweepSpec SweepSpec::load(const std::string& file) {
  ConfigNode root = ConfigNode::from_file(file);
  only_keys(root, {"name", "base", "set", "axes", "seeds", "cell_name", "budget", "baseline", "target"});
  SweepSpec s;
  s.file = file;
  s.name = root.get<std::string>("name");
  if (s.name.empty() || sanitize(s.name) != s.name) {
    root.fail("name", "expected a folder name of letters, digits, '.', '-' and '_'");
  }
  const fs::path base = fs::path(file).parent_path() / root.get<std::string>("base");
  if (!fs::exists(base)) root.fail("base", str("no recipe at '", base.string(), "'"));
  s.base = fs::absolute(base).lexically_normal().string();

  std::vector<std::pair<std::string, std::string>> common;
  if (root.has("set")) {
    ConfigNode set = root.at("set");
    if (!set.is_map()) root.fail("set", "expected a map of dotted keys to values");
    for (const auto& k : set.keys()) common.emplace_back(k, value_of(set, k));
  }
  std::vector<Point> cells{Point{}};
  std::vector<std::string> varied;
  std::set<std::string> labelled_keys;  // keys set by labelled list entries: named by the label
  bool labelled = false;
  if (root.has("axes")) {
    ConfigNode axes = root.at("axes");
    if (!axes.is_sequence()) root.fail("axes", "expected a list of {grid|zip|list: ...}");
    for (size_t i = 0; i < axes.size(); ++i) {
      auto pts = expand_axis(axes[i]);
      for (const auto& p : pts) {
        labelled = labelled || !p.labels.empty();
        if (!p.labels.empty()) {
          for (const auto& kv : p.values) labelled_keys.insert(kv.first);
        }
        for (const auto& kv : p.overrides) {  // axis order, not alphabetical
          if (std::find(varied.begin(), varied.end(), kv.first) == varied.end()) {
            varied.push_back(kv.first);
          }
        }
      }
      std::vector<Point> next;
      for (const auto& c : cells) {
        for (const auto& p : pts) {
          Point q = c;
          q.overrides.insert(q.overrides.end(), p.overrides.begin(), p.overrides.end());
          for (const auto& [k, v] : p.values) q.values[k] = v;
          q.labels.insert(q.labels.end(), p.labels.begin(), p.labels.end());
          next.push_back(std::move(q));
        }
      }
      cells = std::move(next);
    }
  }
  std::vector<int64_t> seeds;  // the `seeds:` list
  if (root.has("seeds")) {
    ConfigNode sd = root.at("seeds");
    if (!sd.is_sequence() || sd.size() == 0) root.fail("seeds", "expected a non-empty list");
    for (size_t i = 0; i < sd.size(); ++i) seeds.push_back(sd[i].as<int64_t>());
    std::vector<Point> next;
    for (const auto& c : cells) {
      for (int64_t seed : seeds) {
        Point q = c;
        q.overrides.emplace_back("seed", std::to_string(seed));
        q.values["seed"] = std::to_string(seed);
        next.push_back(std::move(q));
      }
    }
    cells = std::move(next);
  }
  if (labelled) s.varied_keys.push_back("label");
  s.varied_keys.insert(s.varied_keys.end(), varied.begin(), varied.end());
  if (!seeds.empty()) s.varied_keys.push_back("seed");

  const std::string tmpl = root.get<std::string>("cell_name", "");
  std::set<std::string> names;
  for (size_t i = 0; i < cells.size(); ++i) {
    Point& p = cells[i];
    std::string label;
    for (const auto& l : p.labels) label += (label.empty() ? "" : "_") + l;
    if (!label.empty()) p.values["label"] = label;
    // The default name joins the label and the varied values (the seeds list last); the
    // configuration is that name without the seed.
    std::vector<std::string> parts;
    std::string config;
    if (!label.empty()) parts.push_back(label);
    for (const auto& k : varied) {
      if (!p.values.count(k) || labelled_keys.count(k)) continue;
      const std::string seg = k.substr(k.rfind('.') == std::string::npos ? 0 : k.rfind('.') + 1);
      const std::string part = seg + "-" + sanitize(p.values[k], 40);
      if (k != "seed") config += (config.empty() ? "" : "_") + part;
      parts.push_back(part);
    }
    if (!label.empty()) config = label + (config.empty() ? "" : "_" + config);
    config = sanitize(config);
    if (config.empty()) config = "base";
    if (!seeds.empty()) parts.push_back("s" + p.values["seed"]);
    std::string name;
    if (!tmpl.empty()) {
      size_t pos = 0;
      while (pos < tmpl.size()) {
        const size_t open = tmpl.find('{', pos);
        if (open == std::string::npos) {
          name += tmpl.substr(pos);
          break;
        }
        const size_t close = tmpl.find('}', open);
        if (close == std::string::npos) root.fail("cell_name", "unclosed '{' in the template");
        name += tmpl.substr(pos, open - pos);
        const std::string key = tmpl.substr(open + 1, close - open - 1);
        auto it = p.values.find(key);
        if (it == p.values.end()) {
          root.fail("cell_name", str("'{", key, "}' is not a varied key, label or seed"));
        }
        name += sanitize(it->second, 40);
        pos = close + 1;
      }
      name = sanitize(name);
    } else {
      for (const auto& part : parts) name += (name.empty() ? "" : "_") + part;
      name = sanitize(name);
      if (name.empty()) name = "cell" + std::to_string(i);
    }
    if (!names.insert(name).second) {
      root.fail("cell_name", str("two cells are both named '", name,
                                 "'; put more of the varied keys in the template"));
    }
    SweepCell c;
    c.index = static_cast<int>(i);
    c.name = name;
    c.overrides = common;
    c.overrides.insert(c.overrides.end(), p.overrides.begin(), p.overrides.end());
    c.values = p.values;
    c.config = config;
    if (std::find(s.configs.begin(), s.configs.end(), config) == s.configs.end()) {
      s.configs.push_back(config);
    }
    s.cells.push_back(std::move(c));
  }
  // The seeds, from `seeds:` or an axis over `seed`: every configuration is expected to run each.
  for (const auto& c : s.cells) {
    auto it = c.values.find("seed");
    if (it == c.values.end()) continue;
    char* end = nullptr;
    const int64_t v = std::strtoll(it->second.c_str(), &end, 10);
    if (end == it->second.c_str() || *end != '\0') continue;  // the recipe check names it
    if (std::find(s.seeds.begin(), s.seeds.end(), v) == s.seeds.end()) s.seeds.push_back(v);
  }
  if (root.has("baseline")) {
    s.baseline = root.get<std::string>("baseline");
    if (std::find(s.configs.begin(), s.configs.end(), s.baseline) == s.configs.end()) {
      std::string known;
      for (const auto& c : s.configs) known += (known.empty() ? "" : ", ") + c;
      root.fail("baseline", str("'", s.baseline, "' is not a configuration of this sweep (its "
                                "configurations: ", known, ")"));
    }
    if (s.configs.size() < 2) root.fail("baseline", "needs at least two configurations");
  }
  if (root.has("target")) {
    ConfigNode t = root.at("target");
    if (!t.is_map()) root.fail("target", "expected {val_nelbo: NATS}");
    only_keys(t, {"val_nelbo"});
    s.target_val_nelbo = t.get<double>("val_nelbo");
    if (!(*s.target_val_nelbo > 0)) t.fail("val_nelbo", "expected a positive NELBO in nats/token");
  }
  if (root.has("budget")) {
    ConfigNode b = root.at("budget");
    only_keys(b, {"tokens", "flops"});
    if (b.has("tokens") == b.has("flops")) root.fail("budget", "expected exactly one of tokens, flops");
    if (b.has("tokens")) s.budget_tokens = b.get<double>("tokens");
    if (b.has("flops")) s.budget_flops = b.get<double>("flops");
    if ((s.budget_tokens && !(*s.budget_tokens > 0)) || (s.budget_flops && !(*s.budget_flops > 0))) {
      root.fail("budget", "expected a positive budget");
    }
  }
  return s;
}

int64_t SweepSpec::budget_steps(double tokens_per_step, double flops_per_token,
                                int64_t fallback) const {
  double steps = static_cast<double>(fallback);
  if (budget_tokens) steps = *budget_tokens / tokens_per_step;
  if (budget_flops) steps = *budget_flops / (flops_per_token * tokens_per_step);
  return std::max<int64_t>(1, std::llround(steps));
}

}  // namespace mixdiff

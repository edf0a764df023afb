#include "report/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "core/errors.h"
#include "core/fs.h"
#include "report/stats.h"

namespace mixdiff {

namespace fs = std::filesystem;

namespace {

nlohmann::json read_json(const std::string& path) {
  if (!fs::exists(path)) return nullptr;
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  return j.is_discarded() ? nlohmann::json() : j;
}

double num(const nlohmann::json& j, const char* key, double def = -1) {
  return j.is_object() && j.contains(key) && j[key].is_number() ? j[key].get<double>() : def;
}

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

std::string fmt(double v, int prec = 4) {
  if (v < 0 || !std::isfinite(v)) return "";
  char b[64];
  std::snprintf(b, sizeof(b), "%.*g", prec, v);
  return b;
}

std::string fixed(double v, int prec) {
  char b[64];
  std::snprintf(b, sizeof(b), "%.*f", prec, v);
  std::string o = b;
  // "-0.0000" is zero.
  if (o[0] == '-' && o.find_first_not_of("-0.") == std::string::npos) o.erase(0, 1);
  return o;
}

/// `fixed` for the non-negative quantities of the tables; negative values mean "none": "".
std::string fmt_fixed(double v, int prec) {
  if (v < 0 || !std::isfinite(v)) return "";
  return fixed(v, prec);
}

// ---- SVG charts ----------------------------------------------------------------------------

const char* const kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> pts;
  /// Optional 95% band (lo, hi) per point, drawn shaded under the line; NaN: no band there.
  std::vector<std::pair<double, double>> band;
};

/// About five round tick values covering [lo, hi].
std::vector<double> ticks(double lo, double hi) {
  const double span = hi - lo;
  if (!(span > 0)) return {lo};
  const double raw = span / 5, mag = std::pow(10, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  }
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) t.push_back(v);
  return t;
}

std::string line_chart(const std::string& title, const std::string& xlabel,
                       const std::vector<Series>& series) {
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const auto& s : series) {
    for (size_t i = 0; i < s.pts.size(); ++i) {
      const auto [x, y] = s.pts[i];
      if (!std::isfinite(y)) continue;
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
      if (i < s.band.size() && std::isfinite(s.band[i].first)) {
        y0 = std::min(y0, s.band[i].first), y1 = std::max(y1, s.band[i].second);
      }
    }
  }
  std::ostringstream o;
  o << "<figure><figcaption>" << esc(title) << "</figcaption>";
  if (!std::isfinite(x0)) {
    o << "<p class=\"none\">no data</p></figure>";
    return o.str();
  }
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y1 = y0 + 1;
  const double pad = (y1 - y0) * 0.05;
  y0 -= pad, y1 += pad;
  const double W = 640, H = 300, L = 60, R = 170, T = 10, B = 40;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return T + (1 - (y - y0) / (y1 - y0)) * (H - T - B); };
  o << "<svg viewBox=\"0 0 " << W << " " << H << "\" width=\"" << W << "\" height=\"" << H
    << "\" role=\"img\">";
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\""
    << H - T - B << "\" class=\"plot\"/>";
  for (double t : ticks(y0, y1)) {
    o << "<line x1=\"" << L << "\" x2=\"" << W - R << "\" y1=\"" << py(t) << "\" y2=\"" << py(t)
      << "\" class=\"grid\"/><text x=\"" << L - 4 << "\" y=\"" << py(t) + 4
      << "\" class=\"yt\">" << fmt(t, 4) << "</text>";
  }
  for (double t : ticks(x0, x1)) {
    o << "<text x=\"" << px(t) << "\" y=\"" << H - B + 16 << "\" class=\"xt\">" << fmt(t, 4)
      << "</text>";
  }
  o << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 6 << "\" class=\"xl\">" << esc(xlabel)
    << "</text>";
  for (size_t i = 0; i < series.size(); ++i) {
    const char* c = kColors[i % 10];
    // The band: upper edge left to right, lower edge back.
    std::ostringstream upper, lower;
    std::vector<std::string> low;
    size_t nb = 0;
    for (size_t k = 0; k < series[i].pts.size() && k < series[i].band.size(); ++k) {
      const auto [lo, hi] = series[i].band[k];
      if (!std::isfinite(lo) || !std::isfinite(hi)) continue;
      const double x = px(series[i].pts[k].first);
      upper << (nb++ ? " " : "") << x << "," << py(hi);
      std::ostringstream l;
      l << x << "," << py(lo);
      low.push_back(l.str());
    }
    if (nb >= 2) {
      for (auto it = low.rbegin(); it != low.rend(); ++it) lower << " " << *it;
      o << "<polygon points=\"" << upper.str() << lower.str() << "\" fill=\"" << c
        << "\" fill-opacity=\"0.18\" stroke=\"none\"/>";
    }
    std::ostringstream pts;
    size_t n = 0;
    for (const auto& [x, y] : series[i].pts) {
      if (!std::isfinite(y)) continue;
      pts << (n++ ? " " : "") << px(x) << "," << py(y);
    }
    if (n == 1) {
      const auto& p = series[i].pts.front();
      o << "<circle cx=\"" << px(p.first) << "\" cy=\"" << py(p.second) << "\" r=\"3\" fill=\""
        << c << "\"/>";
    } else if (n > 1) {
      o << "<polyline points=\"" << pts.str() << "\" fill=\"none\" stroke=\"" << c
        << "\" stroke-width=\"1.5\"/>";
    }
    const double ly = T + 14 + 16 * static_cast<double>(i);
    o << "<line x1=\"" << W - R + 10 << "\" x2=\"" << W - R + 28 << "\" y1=\"" << ly - 4
      << "\" y2=\"" << ly - 4 << "\" stroke=\"" << c << "\" stroke-width=\"3\"/><text x=\""
      << W - R + 32 << "\" y=\"" << ly << "\" class=\"lg\">" << esc(series[i].name.substr(0, 24))
      << "</text>";
  }
  o << "</svg></figure>";
  return o.str();
}

/// Diverging colour for a relative load v = load / mean: blue below 1, white at 1, red above
/// (saturating at 0 and 2).
std::string load_colour(double v) {
  if (!std::isfinite(v)) return "#dddddd";
  const double t = std::clamp(v, 0.0, 2.0) - 1.0;  // [-1, 1]
  const int a[3] = {33, 102, 172}, w[3] = {247, 247, 247}, b[3] = {178, 24, 43};
  int c[3];
  for (int k = 0; k < 3; ++k) {
    c[k] = t < 0 ? static_cast<int>(w[k] + (a[k] - w[k]) * -t)
                 : static_cast<int>(w[k] + (b[k] - w[k]) * t);
  }
  char buf[16];
  std::snprintf(buf, sizeof(buf), "#%02x%02x%02x", c[0], c[1], c[2]);
  return buf;
}

/// rows x cols relative loads as coloured cells, with row and column labels.
std::string heatmap(const std::string& title, const std::vector<std::vector<double>>& v,
                    const std::vector<std::string>& col_labels, const std::string& row_name) {
  const size_t rows = v.size(), cols = rows ? v[0].size() : 0;
  std::ostringstream o;
  o << "<figure><figcaption>" << esc(title) << "</figcaption>";
  if (rows == 0 || cols == 0 || col_labels.empty()) {
    o << "<p class=\"none\">no data</p></figure>";
    return o.str();
  }
  const double cw = std::max(3.0, std::min(24.0, 520.0 / static_cast<double>(cols)));
  const double ch = std::max(3.0, std::min(14.0, 220.0 / static_cast<double>(rows)));
  const double L = 50, T = 6, W = L + cw * static_cast<double>(cols) + 10,
               H = T + ch * static_cast<double>(rows) + 22;
  o << "<svg viewBox=\"0 0 " << W << " " << H << "\" width=\"" << W << "\" height=\"" << H
    << "\" role=\"img\">";
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < cols; ++c) {
      o << "<rect x=\"" << L + cw * static_cast<double>(c) << "\" y=\""
        << T + ch * static_cast<double>(r) << "\" width=\"" << cw << "\" height=\"" << ch
        << "\" fill=\"" << load_colour(v[r][c]) << "\"><title>" << esc(row_name) << " " << r
        << ", " << esc(c < col_labels.size() ? col_labels[c] : std::to_string(c)) << ": "
        << fmt(v[r][c], 3) << "</title></rect>";
    }
  }
  o << "<text x=\"" << L - 4 << "\" y=\"" << T + 10 << "\" class=\"yt\">" << esc(row_name)
    << " 0</text><text x=\"" << L - 4 << "\" y=\"" << T + ch * static_cast<double>(rows)
    << "\" class=\"yt\">" << rows - 1 << "</text>";
  o << "<text x=\"" << L << "\" y=\"" << H - 18 << "\" class=\"xs\">" << esc(col_labels.front())
    << "</text><text x=\"" << W - 10 << "\" y=\"" << H - 18 << "\" class=\"xe\">"
    << esc(col_labels.back()) << "</text>";
  o << "</svg></figure>";
  return o.str();
}

struct MoeTrace {
  std::vector<int64_t> steps;
  /// "layer L" (or "layer L, iteration C" for Chain-of-Experts) -> [step][expert] / mean
  std::map<std::string, std::vector<std::vector<double>>> load;
  std::vector<double> imbalance;                             ///< mean max/mean per logged step
  nlohmann::json last;                                       ///< last moe.layers
};

std::string layer_label(const nlohmann::json& l) {
  std::string s = "layer " + std::to_string(l.value("layer", int64_t(-1)));
  if (l.contains("iteration")) s += ", iteration " + std::to_string(l["iteration"].get<int64_t>());
  return s;
}

MoeTrace moe_trace(const RunSummary& r) {
  MoeTrace t;
  for (const auto& m : r.metrics) {
    if (!m.contains("moe")) continue;
    t.steps.push_back(m.value("step", int64_t(0)));
    double imb = 0;
    int n = 0;
    for (const auto& l : m["moe"]["layers"]) {
      std::vector<double> c = l.value("tokens_per_expert", std::vector<double>{});
      double mean = 0;
      for (double x : c) mean += x;
      mean = c.empty() ? 0 : mean / static_cast<double>(c.size());
      for (double& x : c) x = mean > 0 ? x / mean : 0;
      t.load[layer_label(l)].push_back(c);
      if (l.contains("max_mean") && l["max_mean"].is_number()) {
        imb += l["max_mean"].get<double>();
        ++n;
      }
    }
    t.imbalance.push_back(n ? imb / n : std::nan(""));
    t.last = m["moe"]["layers"];
  }
  return t;
}

const char* kStyle =
    "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}"
    "h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}"
    "h3{font-size:15px}table{border-collapse:collapse;font-size:13px;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
    "td.l,th.l{text-align:left}.failed{background:#fde2e2}.grid-c{display:flex;flex-wrap:wrap;"
    "gap:12px}figure{margin:6px 0}figcaption{font-size:13px;font-weight:600;margin-bottom:2px}"
    "svg text{font-size:11px;fill:#333}.plot{fill:#fff;stroke:#999}.grid{stroke:#e5e5e5}"
    ".yt{text-anchor:end}.xt{text-anchor:middle}.xl{text-anchor:middle}.xs{text-anchor:start}"
    ".xe{text-anchor:end}.none{color:#888;font-size:13px}td.sig{font-weight:700;background:#eef6e8}";

std::string results_table_html(const std::vector<RunSummary>& runs,
                               const std::vector<std::string>& keys) {
  std::ostringstream o;
  o << "<table><tr><th class=\"l\">run</th>";
  for (const auto& k : keys) o << "<th class=\"l\">" << esc(k) << "</th>";
  o << "<th>status</th><th>final val NELBO</th><th>best val NELBO</th><th>tokens</th>"
       "<th>tokens/s</th><th>params</th><th>active params</th><th>train GFLOP/token</th>"
       "<th>train PFLOP</th><th>max/mean load</th><th>LBL</th><th>wall s</th>"
       "<th class=\"l\">error</th></tr>";
  for (const auto& r : runs) {
    const double fpt = num(r.info, "train_flops_per_token");
    o << "<tr" << (r.status == "failed" ? " class=\"failed\"" : "") << "><td class=\"l\">"
      << esc(r.name) << "</td>";
    for (const auto& k : keys) {
      const auto& vals = r.cell.is_object() ? r.cell.value("values", nlohmann::json::object())
                                            : nlohmann::json::object();
      o << "<td class=\"l\">" << esc(vals.value(k, std::string())) << "</td>";
    }
    o << "<td>" << esc(r.status) << "</td><td>" << fmt_fixed(r.final_val_nelbo, 4) << "</td><td>"
      << fmt_fixed(r.best_val_nelbo, 4) << "</td><td>" << fmt(r.tokens, 6) << "</td><td>"
      << fmt_fixed(r.tokens_per_s, 0) << "</td><td>" << fmt(num(r.info, "parameters"), 6)
      << "</td><td>" << fmt(num(r.info, "active_parameters"), 6) << "</td><td>"
      << fmt(fpt / 1e9, 4) << "</td><td>" << (fpt > 0 ? fmt(fpt * r.tokens / 1e15, 4) : "")
      << "</td><td>" << fmt_fixed(r.final_max_mean, 3) << "</td><td>" << fmt_fixed(r.final_lbl, 4)
      << "</td><td>" << fmt_fixed(r.wall_s, 0) << "</td><td class=\"l\">" << esc(r.error)
      << "</td></tr>";
  }
  o << "</table>";
  return o.str();
}

std::string table_html(const ResultTable& t) {
  std::ostringstream o;
  o << "<table><tr>";
  for (size_t i = 0; i < t.header.size(); ++i) {
    o << "<th" << (i == 0 ? " class=\"l\"" : "") << ">" << esc(t.header[i]) << "</th>";
  }
  o << "</tr>";
  for (const auto& row : t.rows) {
    o << "<tr>";
    for (size_t i = 0; i < row.size(); ++i) {
      const bool mark = row[i].size() > 2 && row[i].compare(row[i].size() - 2, 2, " *") == 0;
      o << "<td" << (i == 0 ? " class=\"l\"" : mark ? " class=\"sig\"" : "") << ">"
        << esc(row[i]) << "</td>";
    }
    o << "</tr>";
  }
  o << "</table>";
  return o.str();
}

std::vector<std::string> varied_keys(const std::vector<RunSummary>& runs) {
  std::vector<std::string> keys;
  for (const auto& r : runs) {
    if (!r.cell.is_object() || !r.cell.contains("values")) continue;
    for (const auto& [k, v] : r.cell["values"].items()) {
      if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
    }
  }
  return keys;
}

/// Expert specialisation by domain and local routing consistency of a run's last logged
/// interval: a table per layer (overall, per mask-ratio bucket, SRP, SCH) and each layer's load
/// per domain as a heatmap (domains as rows, experts as columns, load / the domain's mean).
std::string specialisation_html(const RunSummary& r) {
  nlohmann::json last;
  for (const auto& m : r.metrics) {
    if (m.contains("moe")) last = m["moe"];
  }
  if (!last.is_object()) return "";
  const auto names = last.value("domains", std::vector<std::string>{});
  std::ostringstream o, maps;
  o << "<table><tr><th class=\"l\">layer</th>";
  if (!names.empty()) o << "<th>specialisation</th>";
  bool header = false;
  std::ostringstream rows;
  for (const auto& l : last["layers"]) {
    rows << "<tr><td class=\"l\">" << esc(layer_label(l)) << "</td>";
    if (!names.empty()) {
      rows << "<td>" << fmt_fixed(num(l, "specialisation", std::nan("")), 3) << "</td>";
      for (const auto& b : l.value("by_mask_ratio", nlohmann::json::array())) {
        if (!header) {
          o << "<th>specialisation, mask ratio [" << fmt(b["mask_ratio"][0].get<double>(), 2)
            << ", " << fmt(b["mask_ratio"][1].get<double>(), 2) << ")</th>";
        }
        rows << "<td>" << fmt_fixed(num(b, "specialisation", std::nan("")), 3) << "</td>";
      }
    }
    if (!header) o << "<th>SRP</th><th>SCH</th>";
    header = true;
    rows << "<td>" << fmt_fixed(num(l, "segment_routing_best", std::nan("")), 3) << "</td><td>"
         << fmt_fixed(num(l, "segment_cache_best_hit", std::nan("")), 3) << "</td></tr>";
    if (!names.empty() && l.contains("by_domain")) {
      std::vector<std::vector<double>> v;
      for (const auto& row : l["by_domain"]) {
        std::vector<double> c = row.get<std::vector<double>>();
        double mean = 0;
        for (double x : c) mean += x;
        mean = c.empty() ? 0 : mean / static_cast<double>(c.size());
        for (double& x : c) x = mean > 0 ? x / mean : std::nan("");
        v.push_back(std::move(c));
      }
      std::vector<std::string> cols;
      for (size_t e = 0; e < (v.empty() ? 0 : v[0].size()); ++e) cols.push_back("expert " + std::to_string(e));
      maps << heatmap(layer_label(l) + ": expert load per domain (" + [&] {
        std::string s;
        for (size_t i = 0; i < names.size(); ++i) s += (i ? ", " : "") + std::to_string(i) + " " + names[i];
        return s;
      }() + ")", v, cols, "domain");
    }
  }
  const nlohmann::json seg = last["layers"].empty() ? nlohmann::json() : last["layers"][0].value("segment", nlohmann::json());
  o << "</tr>" << rows.str() << "</table><p class=\"none\">";
  if (!names.empty()) {
    o << "specialisation: I(expert; domain) / H(domain) of the routed assignments (0: routing "
         "independent of the domain, 1: each expert serves one domain); ";
  }
  o << "SRP: share of the gate mass kept when every segment of " << seg.value("length", 0)
    << " tokens uses its best k experts; SCH: hit rate of the best cache of " << seg.value("cache", 0.0)
    << " x k experts per segment; last logging interval</p>";
  if (!names.empty()) o << "<div class=\"grid-c\">" << maps.str() << "</div>";
  return "<h3>" + esc(r.name) + ": specialisation and local routing consistency</h3>" + o.str();
}

std::string html_report(const std::string& title, const std::vector<RunSummary>& runs,
                        const SweepDesign* design) {
  std::ostringstream o;
  o << "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" << esc(title)
    << "</title><style>" << kStyle << "</style></head><body><h1>" << esc(title) << "</h1>";
  // Replicates: a configuration with several seeds is drawn as its mean with a 95% band.
  bool replicated = false;
  if (design) {
    std::map<std::string, int> n;
    for (const auto& r : runs) replicated = replicated || ++n[r.config] > 1;
  }
  if (replicated) {
    o << "<h2>Configurations</h2><p class=\"none\">mean ± the half-width of its 95% Student-t "
         "interval over the seeds that finished</p>"
      << table_html(configuration_table(runs, *design));
    const ResultTable paired = paired_table(runs, *design);
    if (!paired.header.empty()) {
      o << "<h2>Paired differences to " << esc(design->baseline) << "</h2><p class=\"none\">"
        << "same seeds, so the same data order and masks: mean [95% interval]; marked * and "
           "shaded where the interval excludes zero</p>"
        << table_html(paired);
    }
    o << "<h2>Cells</h2>";
  } else {
    o << "<h2>Results</h2>";
  }
  o << results_table_html(runs, varied_keys(runs));

  auto curves = [&](const char* what, auto&& value) {
    std::vector<Series> s;
    if (!replicated) {
      for (const auto& r : runs) {
        Series ser{r.name, {}, {}};
        for (const auto& m : r.metrics) {
          const double v = value(m);
          if (std::isfinite(v)) ser.pts.emplace_back(num(m, "tokens", 0) / 1e6, v);
        }
        s.push_back(std::move(ser));
      }
      return line_chart(what, "training tokens (millions)", s);
    }
    for (const auto& c : design->configs) {
      // Aligned by step (seeds differ in tokens where random lengths cut a batch): step -> the
      // finished seeds' values and tokens.
      std::map<double, std::pair<std::vector<double>, double>> at;
      for (const auto& r : runs) {
        if (r.config != c || r.status != "finished") continue;
        for (const auto& m : r.metrics) {
          const double v = value(m);
          if (!std::isfinite(v)) continue;
          auto& slot = at[num(m, "step", 0)];
          slot.first.push_back(v);
          slot.second += num(m, "tokens", 0) / 1e6;
        }
      }
      Series ser{c, {}, {}};
      for (const auto& [step, vt] : at) {
        const auto& vs = vt.first;
        const double x = vt.second / static_cast<double>(vs.size());  // mean tokens
        const Interval iv = mean_interval(vs);
        ser.pts.emplace_back(x, iv.mean);
        ser.band.emplace_back(iv.n >= 2 ? iv.lo : std::nan(""), iv.n >= 2 ? iv.hi : std::nan(""));
      }
      if (!ser.pts.empty()) s.push_back(std::move(ser));
    }
    return line_chart(std::string(what) + ", mean and 95% band over seeds",
                      "training tokens (millions)", s);
  };
  o << "<h2>Curves</h2><div class=\"grid-c\">";
  o << curves("training loss (diffusion terms)", [](const nlohmann::json& m) {
    return m.contains("loss") ? m["loss"].get<double>() : std::nan("");
  });
  o << curves("validation NELBO (nats/token)", [](const nlohmann::json& m) {
    return m.contains("val_nelbo") ? m["val_nelbo"].get<double>() : std::nan("");
  });
  o << curves("learning rate", [](const nlohmann::json& m) {
    return m.contains("lr") ? m["lr"].get<double>() : std::nan("");
  });
  o << "</div>";

  std::vector<Series> imb;
  std::ostringstream moe;
  for (const auto& r : runs) {
    MoeTrace t = moe_trace(r);
    if (t.steps.empty()) continue;
    Series s{r.name, {}, {}};
    for (size_t i = 0; i < t.steps.size(); ++i) {
      s.pts.emplace_back(static_cast<double>(t.steps[i]), t.imbalance[i]);
    }
    imb.push_back(std::move(s));
    moe << "<h3>" << esc(r.name) << "</h3><div class=\"grid-c\">";
    std::vector<std::string> cols;
    for (int64_t st : t.steps) cols.push_back("step " + std::to_string(st));
    for (const auto& [layer, rows] : t.load) {
      // rows: [step][expert] -> show experts as rows, steps as columns
      const size_t E = rows.empty() ? 0 : rows[0].size();
      std::vector<std::vector<double>> m(E, std::vector<double>(rows.size(), std::nan("")));
      for (size_t c = 0; c < rows.size(); ++c) {
        for (size_t e = 0; e < E && e < rows[c].size(); ++e) m[e][c] = rows[c][e];
      }
      moe << heatmap(layer + ": expert load / mean over training", m, cols, "expert");
    }
    moe << "</div><p class=\"none\">expert rows, logged steps as columns; blue: below the "
           "mean load, white: the mean, red: twice the mean or more</p>";
    // Load imbalance by mask-ratio bucket at the last logged step.
    moe << "<table><tr><th class=\"l\">layer</th>";
    bool header = false;
    std::ostringstream rows;
    for (const auto& l : t.last) {
      rows << "<tr><td class=\"l\">" << esc(layer_label(l)) << "</td>";
      for (const auto& b : l.value("by_mask_ratio", nlohmann::json::array())) {
        if (!header) {
          moe << "<th>mask ratio [" << fmt(b["mask_ratio"][0].get<double>(), 2) << ", "
              << fmt(b["mask_ratio"][1].get<double>(), 2) << ")</th>";
        }
        const double v = num(b, "max_mean", std::nan(""));
        rows << "<td style=\"background:" << load_colour(std::isfinite(v) ? v - 0.0 : v) << "\">"
             << fmt_fixed(v, 3) << "</td>";
      }
      header = true;
      rows << "</tr>";
    }
    moe << "</tr>" << rows.str()
        << "</table><p class=\"none\">max/mean expert load of the tokens of each mask-ratio "
           "bucket, last logging interval</p>";
    moe << specialisation_html(r);
  }
  if (!imb.empty()) {
    o << "<h2>Routing</h2>"
      << line_chart("load imbalance: max/mean tokens per expert (mean over MoE layers)",
                    "optimizer step", imb)
      << moe.str();
  }
  o << "<p class=\"none\">Written by mixdiff report; self-contained (no scripts, no network).</p>"
       "</body></html>\n";
  return o.str();
}

}  // namespace

RunSummary RunSummary::read(const std::string& dir) {
  RunSummary r;
  r.dir = dir;
  r.name = fs::path(dir).filename().string();
  r.info = read_json(dir + "/run.json");
  r.cell = read_json(dir + "/cell.json");
  if (r.cell.is_object()) {
    r.name = r.cell.value("name", r.name);
    r.status = r.cell.value("status", std::string());
    r.error = r.cell.value("error", std::string());
  }
  if (fs::exists(dir + "/metrics.jsonl")) {
    std::ifstream in(dir + "/metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded()) r.metrics.push_back(std::move(j));
    }
  }
  r.config = r.name;
  if (r.cell.is_object()) {
    r.config = r.cell.value("config", r.config);
    const auto vals = r.cell.value("values", nlohmann::json::object());
    if (vals.contains("seed") && vals["seed"].is_string()) {
      char* end = nullptr;
      const std::string sv = vals["seed"].get<std::string>();
      const long long v = std::strtoll(sv.c_str(), &end, 10);
      if (end != sv.c_str() && *end == '\0') r.seed = v;
    }
  }
  if (r.seed < 0 && r.info.is_object() && r.info.contains("seed") && r.info["seed"].is_number()) {
    r.seed = r.info["seed"].get<int64_t>();
  }
  std::vector<double> tps;
  double eval_s = 0;  // evaluation seconds before the current line
  for (const auto& m : r.metrics) {
    if (m.contains("val_nelbo")) {
      const double v = m["val_nelbo"].get<double>();
      r.final_val_nelbo = v;
      r.best_val_nelbo = r.best_val_nelbo < 0 ? v : std::min(r.best_val_nelbo, v);
      r.final_val_se = num(m, "val_nelbo_se", -1);
      r.val_curve.push_back({num(m, "tokens", 0), num(m, "elapsed_s", 0) - eval_s, v});
      eval_s += num(m, "val_seconds", 0);
    }
    r.tokens = std::max(r.tokens, num(m, "tokens", 0));
    r.wall_s = std::max(r.wall_s, num(m, "elapsed_s", 0));
    if (m.contains("tokens_per_s")) tps.push_back(m["tokens_per_s"].get<double>());
    if (m.contains("aux") && m["aux"].contains("load_balance")) {
      r.final_lbl = m["aux"]["load_balance"].get<double>();
    }
    if (m.contains("moe")) {
      auto mean_of = [&](const char* key) {
        double s = 0;
        int n = 0;
        for (const auto& l : m["moe"]["layers"]) {
          if (l.contains(key) && l[key].is_number()) {
            s += l[key].get<double>();
            ++n;
          }
        }
        return n ? s / n : -1.0;
      };
      r.final_max_mean = mean_of("max_mean");
      r.final_specialisation = mean_of("specialisation");
      r.final_srp = mean_of("segment_routing_best");
      r.final_sch = mean_of("segment_cache_best_hit");
    }
  }
  if (fs::exists(dir + "/eval_tasks.json")) {
    const auto j = nlohmann::json::parse(read_file(dir + "/eval_tasks.json"), nullptr, false);
    if (j.is_object() && j.contains("tasks") && j["tasks"].is_array()) {
      for (const auto& t : j["tasks"]) {
        if (t.contains("task") && t["task"].is_string() && t.contains("acc") && t["acc"].is_number()) {
          r.task_acc[t["task"].get<std::string>()] = t["acc"].get<double>();
        }
      }
    }
  }
  if (!tps.empty()) {  // the first interval includes start-up
    double s = 0;
    for (size_t i = tps.size() > 1 ? 1 : 0; i < tps.size(); ++i) s += tps[i];
    r.tokens_per_s = s / static_cast<double>(tps.size() > 1 ? tps.size() - 1 : 1);
  }
  if (r.status.empty()) {
    if (!r.info.is_object()) {
      r.status = "pending";
    } else {
      const double steps = num(r.info, "steps", 0);
      const double last = r.metrics.empty() ? 0 : num(r.metrics.back(), "step", 0);
      r.status = steps > 0 && last >= steps ? "finished" : "partial";
    }
  }
  return r;
}

namespace {

double crossing(const std::vector<RunSummary::ValPoint>& c, double target, bool seconds) {
  for (size_t i = 0; i < c.size(); ++i) {
    if (!(c[i].nelbo <= target)) continue;
    const double x1 = seconds ? c[i].train_s : c[i].tokens;
    if (i == 0) return x1;
    const double x0 = seconds ? c[i - 1].train_s : c[i - 1].tokens;
    const double v0 = c[i - 1].nelbo, v1 = c[i].nelbo;
    return v0 > v1 ? x0 + (v0 - target) / (v0 - v1) * (x1 - x0) : x1;
  }
  return std::nan("");
}

}  // namespace

double RunSummary::tokens_to(double target) const { return crossing(val_curve, target, false); }
double RunSummary::seconds_to(double target) const { return crossing(val_curve, target, true); }

SweepDesign SweepDesign::read(const std::string& sweep_dir, const std::vector<RunSummary>& runs) {
  SweepDesign d;
  const nlohmann::json j = read_json(sweep_dir + "/sweep.json");
  if (j.is_object()) {
    d.keys = j.value("varied_keys", std::vector<std::string>{});
    d.configs = j.value("configs", std::vector<std::string>{});
    d.seeds = j.value("seeds", std::vector<int64_t>{});
    d.baseline = j.value("baseline", std::string());
    d.target_val_nelbo = j.value("target_val_nelbo", -1.0);
  }
  for (const auto& r : runs) {  // configurations of cells the file does not list (older sweeps)
    if (std::find(d.configs.begin(), d.configs.end(), r.config) == d.configs.end()) {
      d.configs.push_back(r.config);
    }
    if (!r.cell.is_object() || !r.cell.contains("values")) continue;
    for (const auto& [k, v] : r.cell["values"].items()) {
      if (std::find(d.keys.begin(), d.keys.end(), k) == d.keys.end()) d.keys.push_back(k);
    }
  }
  return d;
}

namespace {

/// A per-run number the configuration and paired tables summarise; NaN where a run lacks it.
struct Metric {
  std::string key, label;
  int prec;
  std::function<double(const RunSummary&)> get;
};

double pos(double v) { return v >= 0 && std::isfinite(v) ? v : std::nan(""); }

std::vector<Metric> metrics_of(const std::vector<RunSummary>& runs, const SweepDesign& d) {
  std::vector<Metric> all = {
      {"final_val_nelbo", "final val NELBO", 4, [](const RunSummary& r) { return pos(r.final_val_nelbo); }},
      {"best_val_nelbo", "best val NELBO", 4, [](const RunSummary& r) { return pos(r.best_val_nelbo); }},
      {"val_nelbo_se", "val NELBO s.e.", 4, [](const RunSummary& r) { return pos(r.final_val_se); }},
      {"max_mean_load", "max/mean load", 3, [](const RunSummary& r) { return pos(r.final_max_mean); }},
      {"load_balance", "LBL", 4, [](const RunSummary& r) { return pos(r.final_lbl); }},
      {"specialisation", "specialisation", 3, [](const RunSummary& r) { return pos(r.final_specialisation); }},
      {"segment_routing_best", "SRP", 3, [](const RunSummary& r) { return pos(r.final_srp); }},
      {"segment_cache_best_hit", "SCH", 3, [](const RunSummary& r) { return pos(r.final_sch); }},
      {"tokens_per_s", "tokens/s", 0, [](const RunSummary& r) { return r.tokens_per_s > 0 ? r.tokens_per_s : std::nan(""); }},
      {"wall_s", "wall s", 0, [](const RunSummary& r) { return r.wall_s > 0 ? r.wall_s : std::nan(""); }},
  };
  if (d.target_val_nelbo > 0) {
    const double t = d.target_val_nelbo;
    char b[64];
    std::snprintf(b, sizeof(b), "%.4g", t);
    all.push_back({"tokens_to_target", str("tokens to val NELBO ", b), 0,
                   [t](const RunSummary& r) { return r.tokens_to(t); }});
    all.push_back({"train_s_to_target", str("training s to val NELBO ", b), 0,
                   [t](const RunSummary& r) { return r.seconds_to(t); }});
  }
  std::set<std::string> task_names;
  for (const auto& r : runs) {
    for (const auto& [name, acc] : r.task_acc) task_names.insert(name);
  }
  for (const auto& name : task_names) {
    all.push_back({"acc_" + name, "acc " + name, 3, [name](const RunSummary& r) {
                     auto it = r.task_acc.find(name);
                     return it == r.task_acc.end() ? std::nan("") : it->second;
                   }});
  }
  std::vector<Metric> present;  // only the metrics some run has
  for (auto& m : all) {
    bool any = m.key.find("_to_target") != std::string::npos;  // shown even when none reached it
    for (const auto& r : runs) any = any || std::isfinite(m.get(r));
    if (any) present.push_back(std::move(m));
  }
  return present;
}

/// The finished runs of `config`, by seed (a seed run twice keeps its last).
std::map<int64_t, const RunSummary*> finished_by_seed(const std::vector<RunSummary>& runs,
                                                      const std::string& config) {
  std::map<int64_t, const RunSummary*> out;
  for (const auto& r : runs) {
    if (r.config == config && r.status == "finished") out[r.seed] = &r;
  }
  return out;
}

/// "mean ± half" (one value: the value); " (n of N)" when fewer runs have it than finished.
std::string interval_text(const Interval& iv, int prec, size_t finished) {
  std::string s = iv.n >= 2 ? fixed(iv.mean, prec) + " ± " + fixed(iv.half, prec)
                            : fixed(iv.mean, prec);
  if (static_cast<size_t>(iv.n) < finished) s += str(" (", iv.n, " of ", finished, ")");
  return s;
}

struct ConfigStats {
  std::string config;
  std::vector<int64_t> seeds_run, missing;
  std::vector<std::optional<Interval>> metric;  ///< per metric; none without a value
  std::vector<std::optional<Interval>> diff;    ///< per metric, paired to the baseline
};

std::vector<ConfigStats> config_stats(const std::vector<RunSummary>& runs, const SweepDesign& d,
                                      const std::vector<Metric>& ms) {
  std::vector<ConfigStats> out;
  const auto base = finished_by_seed(runs, d.baseline);
  for (const auto& c : d.configs) {
    ConfigStats cs;
    cs.config = c;
    const auto by_seed = finished_by_seed(runs, c);
    for (const auto& [seed, r] : by_seed) cs.seeds_run.push_back(seed);
    for (int64_t s : d.seeds) {
      if (!by_seed.count(s)) cs.missing.push_back(s);
    }
    for (const auto& m : ms) {
      std::vector<double> v, a, b;
      for (const auto& [seed, r] : by_seed) {
        const double x = m.get(*r);
        if (std::isfinite(x)) v.push_back(x);
        auto it = base.find(seed);
        if (d.baseline.empty() || c == d.baseline || it == base.end()) continue;
        const double y = m.get(*it->second);
        if (std::isfinite(x) && std::isfinite(y)) a.push_back(x), b.push_back(y);
      }
      cs.metric.push_back(v.empty() ? std::nullopt : std::optional<Interval>(mean_interval(v)));
      cs.diff.push_back(a.empty() ? std::nullopt
                                  : std::optional<Interval>(paired_interval(a, b)));
    }
    out.push_back(std::move(cs));
  }
  return out;
}

std::string seeds_text(const ConfigStats& cs, const SweepDesign& d) {
  std::string s = std::to_string(cs.seeds_run.size());
  if (!d.seeds.empty()) s += " of " + std::to_string(d.seeds.size());
  if (!cs.missing.empty()) {
    s += " (missing:";
    for (int64_t m : cs.missing) s += " " + std::to_string(m);
    s += ")";
  }
  return s;
}

}  // namespace

ResultTable configuration_table(const std::vector<RunSummary>& runs, const SweepDesign& d) {
  const auto ms = metrics_of(runs, d);
  ResultTable t;
  t.header = {"configuration", "seeds"};
  for (const auto& m : ms) t.header.push_back(m.label);
  for (const auto& cs : config_stats(runs, d, ms)) {
    std::vector<std::string> row{cs.config + (cs.config == d.baseline ? " (baseline)" : ""),
                                 seeds_text(cs, d)};
    for (size_t i = 0; i < ms.size(); ++i) {
      // A target no finished seed reached says so; a metric the configuration lacks (the load of
      // a dense model) stays empty.
      const bool target = ms[i].key.find("_to_target") != std::string::npos;
      row.push_back(cs.metric[i] ? interval_text(*cs.metric[i], ms[i].prec, cs.seeds_run.size())
                                 : std::string(target && !cs.seeds_run.empty() ? "not reached" : ""));
    }
    t.rows.push_back(std::move(row));
  }
  return t;
}

ResultTable paired_table(const std::vector<RunSummary>& runs, const SweepDesign& d) {
  ResultTable t;
  if (d.baseline.empty()) return t;
  const auto ms = metrics_of(runs, d);
  t.header = {"configuration - " + d.baseline, "seeds paired"};
  for (const auto& m : ms) t.header.push_back("Δ " + m.label);
  for (const auto& cs : config_stats(runs, d, ms)) {
    if (cs.config == d.baseline) continue;
    int paired = 0;
    for (const auto& iv : cs.diff) paired = std::max(paired, iv ? iv->n : 0);
    std::vector<std::string> row{cs.config, std::to_string(paired)};
    for (size_t i = 0; i < ms.size(); ++i) {
      if (!cs.diff[i]) {
        row.emplace_back();
        continue;
      }
      const Interval& iv = *cs.diff[i];
      const int p = ms[i].prec;
      row.push_back(iv.n >= 2 ? str(fixed(iv.mean, p), " [", fixed(iv.lo, p), ", ",
                                    fixed(iv.hi, p), "]", iv.excludes_zero() ? " *" : "")
                              : fixed(iv.mean, p) + " (1 seed)");
    }
    t.rows.push_back(std::move(row));
  }
  return t;
}

std::vector<RunSummary> read_sweep(const std::string& sweep_dir) {
  std::vector<RunSummary> runs;
  if (!fs::is_directory(sweep_dir)) return runs;
  for (const auto& e : fs::directory_iterator(sweep_dir)) {
    if (!e.is_directory()) continue;
    const std::string d = e.path().string();
    if (fs::exists(d + "/cell.json") || fs::exists(d + "/run.json")) {
      runs.push_back(RunSummary::read(d));
    }
  }
  std::sort(runs.begin(), runs.end(), [](const RunSummary& a, const RunSummary& b) {
    const int64_t ia = a.cell.is_object() ? a.cell.value("index", int64_t(1 << 30)) : (1 << 30);
    const int64_t ib = b.cell.is_object() ? b.cell.value("index", int64_t(1 << 30)) : (1 << 30);
    return ia != ib ? ia < ib : a.name < b.name;
  });
  return runs;
}

namespace {

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string o = "\"";
  for (char c : s) o += c == '"' ? std::string("\"\"") : std::string(1, c);
  return o + "\"";
}

std::vector<std::vector<std::string>> result_rows(const std::vector<RunSummary>& runs,
                                                  const std::vector<std::string>& keys) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> head{"run", "configuration"};
  head.insert(head.end(), keys.begin(), keys.end());
  for (const char* h : {"status", "final_val_nelbo", "best_val_nelbo", "tokens", "tokens_per_s",
                        "parameters", "active_parameters", "train_flops_per_token", "train_flops",
                        "max_mean_load", "load_balance", "specialisation", "wall_s", "error"}) {
    head.push_back(h);
  }
  rows.push_back(head);
  for (const auto& r : runs) {
    std::vector<std::string> row{r.name, r.config};
    const auto vals = r.cell.is_object() ? r.cell.value("values", nlohmann::json::object())
                                         : nlohmann::json::object();
    for (const auto& k : keys) row.push_back(vals.value(k, std::string()));
    const double fpt = num(r.info, "train_flops_per_token");
    row.push_back(r.status);
    row.push_back(fmt_fixed(r.final_val_nelbo, 4));
    row.push_back(fmt_fixed(r.best_val_nelbo, 4));
    row.push_back(r.tokens > 0 ? fmt_fixed(r.tokens, 0) : "");
    row.push_back(fmt_fixed(r.tokens_per_s, 0));
    row.push_back(r.info.is_object() ? fmt_fixed(num(r.info, "parameters"), 0) : "");
    row.push_back(r.info.is_object() ? fmt_fixed(num(r.info, "active_parameters"), 0) : "");
    row.push_back(fpt > 0 ? fmt(fpt, 6) : "");
    row.push_back(fpt > 0 && r.tokens > 0 ? fmt(fpt * r.tokens, 6) : "");
    row.push_back(fmt_fixed(r.final_max_mean, 3));
    row.push_back(fmt_fixed(r.final_lbl, 4));
    row.push_back(fmt_fixed(r.final_specialisation, 3));
    row.push_back(fmt_fixed(r.wall_s, 0));
    row.push_back(r.error);
    rows.push_back(row);
  }
  return rows;
}

std::string csv_line(const std::vector<std::string>& row) {
  std::string o;
  for (size_t i = 0; i < row.size(); ++i) o += (i ? "," : "") + csv_field(row[i]);
  return o + "\n";
}

std::string markdown_table(const std::vector<std::vector<std::string>>& rows) {
  std::ostringstream o;
  for (size_t r = 0; r < rows.size(); ++r) {
    o << "|";
    for (const auto& c : rows[r]) {
      std::string v = c;
      std::replace(v.begin(), v.end(), '|', '/');
      std::replace(v.begin(), v.end(), '\n', ' ');
      o << " " << v << " |";
    }
    o << "\n";
    if (r == 0) {
      o << "|";
      for (size_t i = 0; i < rows[0].size(); ++i) o << "---|";
      o << "\n";
    }
  }
  return o.str();
}

std::vector<std::vector<std::string>> with_header(const ResultTable& t) {
  std::vector<std::vector<std::string>> rows{t.header};
  rows.insert(rows.end(), t.rows.begin(), t.rows.end());
  return rows;
}

std::string csv_number(double v) {
  if (!std::isfinite(v)) return "";
  char b[64];
  std::snprintf(b, sizeof(b), "%.8g", v);
  return b;
}

}  // namespace

std::string cells_csv(const std::vector<RunSummary>& runs, const std::vector<std::string>& keys) {
  std::string o;
  for (const auto& row : result_rows(runs, keys)) o += csv_line(row);
  return o;
}

std::string results_csv(const std::vector<RunSummary>& runs, const SweepDesign& d) {
  const auto ms = metrics_of(runs, d);
  std::vector<std::string> head{"configuration", "baseline", "seeds_finished", "seeds_expected",
                                "missing_seeds"};
  for (const auto& m : ms) {
    for (const char* suf : {"_mean", "_ci95_low", "_ci95_high", "_n"}) head.push_back(m.key + suf);
    if (d.baseline.empty()) continue;
    for (const char* suf : {"_diff_mean", "_diff_ci95_low", "_diff_ci95_high", "_diff_n"}) {
      head.push_back(m.key + suf);
    }
  }
  std::string o = csv_line(head);
  for (const auto& cs : config_stats(runs, d, ms)) {
    std::string missing;
    for (int64_t m : cs.missing) missing += (missing.empty() ? "" : " ") + std::to_string(m);
    std::vector<std::string> row{cs.config, cs.config == d.baseline ? "yes" : "",
                                 std::to_string(cs.seeds_run.size()),
                                 d.seeds.empty() ? "" : std::to_string(d.seeds.size()), missing};
    auto put = [&](const std::optional<Interval>& iv) {
      if (!iv) {
        row.insert(row.end(), {"", "", "", "0"});
        return;
      }
      row.push_back(csv_number(iv->mean));
      row.push_back(iv->n >= 2 ? csv_number(iv->lo) : "");
      row.push_back(iv->n >= 2 ? csv_number(iv->hi) : "");
      row.push_back(std::to_string(iv->n));
    };
    for (size_t i = 0; i < ms.size(); ++i) {
      put(cs.metric[i]);
      if (!d.baseline.empty()) put(cs.diff[i]);
    }
    o += csv_line(row);
  }
  return o;
}

std::string results_markdown(const std::vector<RunSummary>& runs, const SweepDesign& d) {
  std::ostringstream o;
  o << "Configurations: mean ± the half-width of its 95% Student-t interval over the seeds that "
       "finished\n\n"
    << markdown_table(with_header(configuration_table(runs, d)));
  const ResultTable paired = paired_table(runs, d);
  if (!paired.header.empty()) {
    o << "\nPaired differences to " << d.baseline
      << " (same seeds: same data order and masks): mean [95% interval]; * the interval excludes "
         "zero\n\n"
      << markdown_table(with_header(paired));
  }
  o << "\nCells\n\n" << markdown_table(result_rows(runs, d.keys));
  return o.str();
}

std::string write_report(const std::string& dir) {
  if (!fs::is_directory(dir)) throw InputError(str(dir, ": no such run or sweep folder"));
  std::vector<RunSummary> runs;
  std::string title;
  std::optional<SweepDesign> design;
  if (fs::exists(dir + "/run.json")) {
    runs.push_back(RunSummary::read(dir));
    title = "MixDiff run " + runs[0].name;
  } else {
    runs = read_sweep(dir);
    if (runs.empty()) {
      throw InputError(str(dir, ": holds neither run.json nor sweep cells (folders with "
                                "run.json or cell.json)"));
    }
    title = "MixDiff sweep " + fs::path(dir).filename().string();
    design = SweepDesign::read(dir, runs);
  }
  const std::string path = dir + "/report.html";
  write_file_atomic(path, html_report(title, runs, design ? &*design : nullptr));
  return path;
}

}  // namespace mixdiff

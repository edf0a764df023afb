// Strict recipe reader: typed reads, unknown keys, overrides, resolved round trip.
#include <gtest/gtest.h>

#include <functional>

#include "core/config.h"
#include "core/errors.h"

namespace mixdiff {
namespace {

const char* kRecipe =
    "name: t\n"
    "model:\n"
    "  d_model: 64\n"
    "  n_layer: four\n"
    "  tie: true\n"
    "losses:\n"
    "  - {kind: a, weight: 0.5}\n"
    "lr: 3e-4\n";

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(UnitConfig, TypedReadsAndDefaults) {
  auto c = ConfigNode::from_string(kRecipe, "r.yaml");
  auto m = c.at("model");
  EXPECT_EQ(m.get<int64_t>("d_model"), 64);
  EXPECT_TRUE(m.get<bool>("tie"));
  EXPECT_DOUBLE_EQ(c.get<double>("lr"), 3e-4);
  EXPECT_EQ(m.get<std::string>("attention", "full"), "full");
  EXPECT_DOUBLE_EQ(c.get<double>("eps", 1e-8), 1e-8);
  EXPECT_FALSE(c.get_optional<double>("threshold").has_value());
}

TEST(UnitConfig, WrongTypeNamesFileLineAndKey) {
  auto c = ConfigNode::from_string(kRecipe, "r.yaml");
  const std::string e = error_of([&] { c.at("model").get<int64_t>("n_layer"); });
  EXPECT_EQ(e, "r.yaml:4:12: model.n_layer: expected an integer, got 'four'");
  EXPECT_NE(error_of([&] { c.at("model").get<bool>("d_model"); }).find("expected true or false"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.get<double>("name"); }).find("expected a number, got 't'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.at("model").get<int64_t>("missing"); })
                .find("model: missing required key 'missing'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.get<int64_t>("lr"); }).find("expected an integer"), std::string::npos);
}

enum class Shade { kLight, kDark };

TEST(UnitConfig, ChoicesAreReadOnceIntoEnumsAndNamedWhenWrong) {
  auto c = ConfigNode::from_string("{a: dark, b: grey}", "r.yaml");
  const std::vector<std::pair<std::string, Shade>> shades = {{"light", Shade::kLight},
                                                             {"dark", Shade::kDark}};
  EXPECT_EQ(c.get_choice<Shade>("a", shades, Shade::kLight), Shade::kDark);
  EXPECT_EQ(c.get_choice<Shade>("absent", shades, Shade::kDark), Shade::kDark);
  EXPECT_EQ(c.get<std::string>("absent"), "dark");  // the default is written back by name
  EXPECT_EQ(error_of([&] { c.get_choice<Shade>("b", shades, Shade::kLight); }),
            "r.yaml:1:14: b: expected one of light, dark, got 'grey'");
}

TEST(UnitConfig, UnknownKeyNamesLineAndKnownKeys) {
  auto c = ConfigNode::from_string(kRecipe, "r.yaml");
  c.get<std::string>("name");
  c.get<double>("lr");
  auto m = c.at("model");
  m.get<int64_t>("d_model");
  m.get<bool>("tie");
  c.at("losses")[0].get<std::string>("kind");
  c.at("losses")[0].get<double>("weight");
  const std::string e = error_of([&] { c.check_unknown_keys(); });
  EXPECT_EQ(e, "r.yaml:4:3: model.n_layer: unknown key 'n_layer' (known: d_model, tie)");
}

TEST(UnitConfig, OverridesGoThroughTheSameChecks) {
  auto c = ConfigNode::from_string(kRecipe, "r.yaml");
  c.apply_override("model.n_layer=3");
  c.apply_override("losses.0.weight=abc");
  c.apply_override("train.steps=10");  // creates a new section
  EXPECT_EQ(c.at("model").get<int64_t>("n_layer"), 3);
  EXPECT_EQ(c.at("train").get<int64_t>("steps"), 10);
  EXPECT_EQ(error_of([&] { c.at("losses")[0].get<double>("weight"); }),
            "--set losses.0.weight=abc: losses.0.weight: expected a number, got 'abc'");
  EXPECT_NE(error_of([&] { c.apply_override("noequals"); }).find("expected key.path=value"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.apply_override("lr.x=1"); }).find("'lr' is a value, not a map"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.apply_override("losses.5.weight=1"); }).find("out of range"),
            std::string::npos);
}

TEST(UnitConfig, UnusedOverrideIsRejected) {
  auto c = ConfigNode::from_string(kRecipe, "r.yaml");
  c.apply_override("model.d_modle=3");
  c.at("model").get<int64_t>("d_model");
  EXPECT_NE(error_of([&] { c.check_overrides_used(); })
                .find("--set model.d_modle=3: unknown key 'model.d_modle'"),
            std::string::npos);
}

TEST(UnitConfig, YamlSyntaxErrorNamesLine) {
  const std::string e = error_of([] { ConfigNode::from_string("a: [1, 2\nb: 3\n", "bad.yaml"); });
  EXPECT_EQ(e.rfind("bad.yaml:", 0), 0u);
  EXPECT_NE(e.find("YAML syntax error"), std::string::npos);
  EXPECT_NE(error_of([] { ConfigNode::from_file("/nonexistent/recipe.yaml"); })
                .find("cannot open recipe file"),
            std::string::npos);
}

TEST(RoundtripConfig, ResolvedRecipeReadsBackIdentically) {
  auto read_all = [](const ConfigNode& c) {
    auto m = c.at("model");
    m.get<int64_t>("d_model");
    m.get<bool>("tie");
    m.get<std::string>("n_layer");
    m.get<double>("dropout", 0.1);
    m.get<std::vector<double>>("betas", {0.9, 0.95});
    m.get_optional<double>("threshold");
    c.get<double>("lr");
    c.get<std::string>("name");
    c.at("losses")[0].get<double>("weight");
    c.at("losses")[0].get<std::string>("kind");
    c.section("eval").get<int64_t>("every", 100);
    c.check_unknown_keys();
  };
  auto a = ConfigNode::from_string(kRecipe, "r.yaml");
  read_all(a);
  const std::string y1 = a.to_yaml();
  auto b = ConfigNode::from_string(y1, "resolved.yaml");
  read_all(b);
  EXPECT_EQ(y1, b.to_yaml());
  EXPECT_DOUBLE_EQ(b.at("model").get<double>("dropout"), 0.1);
  EXPECT_NE(y1.find("dropout: 0.1\n"), std::string::npos) << y1;
}

TEST(UnitConfig, CanonicalYamlIgnoresLayoutNotContent) {
  const std::string flow = "{b: 1, a: [x, {d: 2, c: '3'}]}";
  const std::string block = "# a comment\na:\n  - x\n  - c: 3\n    d: 2\nb: 1\n";
  EXPECT_EQ(canonical_yaml(flow), canonical_yaml(block));
  EXPECT_EQ(canonical_yaml(canonical_yaml(block)), canonical_yaml(block));
  EXPECT_NE(canonical_yaml(flow), canonical_yaml("{b: 1, a: [x, {d: 2, c: 4}]}"));
  EXPECT_NE(canonical_yaml(flow), canonical_yaml("{b: 1, a: [{d: 2, c: 3}, x]}"));  // order kept
  EXPECT_THROW(canonical_yaml("a: [1, 2"), ConfigError);
}

TEST(UnitConfig, FormatDoubleIsShortestExact) {
  EXPECT_EQ(format_double(3e-4), "0.0003");
  EXPECT_EQ(format_double(0.1), "0.1");
  EXPECT_EQ(format_double(1.0), "1.0");
  EXPECT_EQ(format_double(1e-8), "1e-08");
  for (double v : {1.0 / 3, 2.5e-7, 123456.789}) EXPECT_EQ(std::stod(format_double(v)), v);
}

}  // namespace
}  // namespace mixdiff

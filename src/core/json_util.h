// Reading integers from JSON files users hand us: nlohmann's get<int64_t>() on a float such as
// 4e35 is undefined behaviour (found by fuzzing), so the type is checked first.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace mixdiff {

/// j.at(key) as int64, or nlohmann::json::type_error (callers turn it into their error line).
inline int64_t json_int(const nlohmann::json& j, const char* key) {
  const auto& v = j.at(key);
  if (!v.is_number_integer()) {
    throw nlohmann::json::type_error::create(302, std::string("'") + key + "' must be an integer", &v);
  }
  return v.get<int64_t>();
}

}  // namespace mixdiff

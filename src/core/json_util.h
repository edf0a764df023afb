// Reading integers from JSON files users hand us: nlohmann's get<int64_t>() on a float such as
// 4e35 is undefined behaviour (found by fuzzing), so the type is checked first.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "core/errors.h"
#include "core/fs.h"

namespace mixdiff {

/// j.at(key) as int64, or nlohmann::json::type_error (callers turn it into their error line).
inline int64_t json_int(const nlohmann::json& j, const char* key) {
  const auto& v = j.at(key);
  if (!v.is_number_integer()) {
    throw nlohmann::json::type_error::create(302, std::string("'") + key + "' must be an integer", &v);
  }
  return v.get<int64_t>();
}

/// A whole JSON file (read_file's errors when it cannot be read); DataError "PATH: invalid JSON
/// at byte N" when it does not parse.
inline nlohmann::json read_json_file(const std::string& path, const std::string& what = "JSON file") {
  const std::string text = read_file(path, what);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw DataError(str(path, ": invalid JSON at byte ", e.byte));
  }
}

/// JSON Lines: fn(object, line number) for every non-blank line of `text`; a line that is not a
/// JSON object throws Error("WHERE line N: ...") (task files, requests, SFT pairs).
template <class Error = InputError>
void for_each_json_line(const std::string& text, const std::string& where,
                        const std::function<void(const nlohmann::json&, int64_t)>& fn) {
  std::istringstream in(text);
  int64_t n = 0;
  for (std::string line; std::getline(in, line);) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw Error(str(where, " line ", n, ": not valid JSON (", e.what(), ")"));
    }
    if (!j.is_object()) throw Error(str(where, " line ", n, ": expected a JSON object per line"));
    fn(j, n);
  }
}

}  // namespace mixdiff

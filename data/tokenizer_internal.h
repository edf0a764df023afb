// Internal to data/, not a public API: the helpers that the encoder (data/tokenizer.cpp) and the
// BPE trainer (data/bpe_trainer.cpp) share: UTF-8 checks, printable/quote for messages, GPT-2's
// byte alphabet, and the pair key and hash of merge tables.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace mixdiff {
namespace tokenizer_detail {

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers

// Length of the well-formed UTF-8 sequence at p (RFC 3629: no overlongs, no surrogates, at most
// U+10FFFF, the same rules PCRE2's own check applies), or 0 when p does not start one.
inline size_t utf8_sequence_length(const unsigned char* p, size_t avail) {
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  auto cont = [&](size_t i) { return i < avail && (p[i] & 0xC0) == 0x80; };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (avail < 2) return 0;
    const unsigned char lo = c == 0xE0 ? 0xA0 : 0x80;
    const unsigned char hi = c == 0xED ? 0x9F : 0xBF;
    if (p[1] < lo || p[1] > hi) return 0;
    return cont(2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (avail < 2) return 0;
    const unsigned char lo = c == 0xF0 ? 0x90 : 0x80;
    const unsigned char hi = c == 0xF4 ? 0x8F : 0xBF;
    if (p[1] < lo || p[1] > hi) return 0;
    return cont(2) && cont(3) ? 4 : 0;
  }
  return 0;
}

inline bool is_valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    const size_t len = utf8_sequence_length(p + i, s.size() - i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    // The byte alphabet stops at U+0143, so three-byte forms are never needed here.
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Messages must stay on one line, and valid UTF-8 for whatever logs them, even when the offending
// text is binary: control characters and bytes outside valid sequences become \xNN. With
// `quoted`, the result is wrapped in double quotes and inner quotes/backslashes are escaped.
inline std::string printable(std::string_view s, size_t max_bytes, bool quoted) {
  std::string out = quoted ? "\"" : "";
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    if (i >= max_bytes) {
      out += "...";
      break;
    }
    const size_t len = utf8_sequence_length(p + i, s.size() - i);
    if (len > 1) {
      out.append(s.data() + i, len);
      i += len;
      continue;
    }
    const unsigned char c = p[i++];
    if (len == 1 && c >= 0x20 && c != 0x7F) {
      if (quoted && (c == '"' || c == '\\')) out += '\\';
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (quoted) out += '"';
  return out;
}

inline std::string quote(std::string_view s) { return printable(s, 80, true); }

// ---------------------------------------------------------------------------------------------
// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes are
// shifted to U+0100.. in byte order, so every token is a printable string without spaces.

struct ByteAlphabet {
  std::array<std::string, 256> symbol;  // byte -> UTF-8 of its code point
  std::array<int16_t, 0x144> byte_of;   // code point -> byte, -1 outside the alphabet

  ByteAlphabet() {
    byte_of.fill(-1);
    uint32_t next_shifted = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next_shifted++;
      append_utf8(symbol[b], cp);
      byte_of[cp] = static_cast<int16_t>(b);
    }
  }
};

inline const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// ---------------------------------------------------------------------------------------------
// Small shared pieces

inline uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// libstdc++ hashes integers as themselves; pair keys differ mostly in their high half, so mix them
// (splitmix64 finaliser) to keep bucket chains short.
struct PairHash {
  size_t operator()(uint64_t x) const {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return static_cast<size_t>(x);
  }
};

}  // namespace tokenizer_detail
}  // namespace mixdiff

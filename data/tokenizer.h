// Tokenizers: a byte-level BPE that MixDiff trains itself, and GPT-2 style `encoder.json` +
// `vocab.bpe` files loaded from a path. Both use the same algorithm and the same on-disk format
// (the GPT-2 format), so a trained vocabulary can be read by other tools, and GPT-2's own files
// plug in unchanged.
//
// Pre-tokenisation uses GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// through PCRE2 (UTF + UCP, JIT when available): std::regex cannot express \p{L}.
// Invalid UTF-8 in the input is not an error: such bytes are split as single-byte pieces, so
// every byte string round-trips through encode/decode.
//
// Another pre-tokenizer pattern can be set (a Hugging Face tokenizer.json's Split regex: Qwen2/3,
// Llama-3), and `ignore_merges` (a pre-token that is itself a token is encoded as that token).
//
// A tokenizer folder holds `tokenizer.json` ({"kind": "byte_bpe"|"gpt2"|"hf_bpe",
// "format_version": 1, "encoder": "encoder.json", "merges": "vocab.bpe", "eos": "<|endoftext|>",
// optional "pattern": "...", "ignore_merges": true}) next to the two GPT-2 files. The mask token of the diffusion model is not part of the tokenizer: the model reserves id
// `vocab_size()` for it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace mixdiff {

/// Splits text into pre-tokens with GPT-2's regex or `pattern` (PCRE2; text between matches is a
/// piece too, as Hugging Face's Split with behavior "Isolated" does). Thread-compatible.
class Pretokenizer {
 public:
  /// Throws DataError when PCRE2 rejects the pattern. Empty: GPT-2's.
  explicit Pretokenizer(const std::string& pattern = {});
  ~Pretokenizer();
  Pretokenizer(Pretokenizer&&) noexcept;
  Pretokenizer& operator=(Pretokenizer&&) noexcept;
  Pretokenizer(const Pretokenizer&) = delete;
  Pretokenizer& operator=(const Pretokenizer&) = delete;
  /// Pieces are views into `text`; their concatenation equals `text`.
  std::vector<std::string_view> split(std::string_view text) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Byte-level BPE with GPT-2 semantics (byte-to-unicode alphabet, ranked merges).
class ByteLevelBpe {
 public:
  /// Loads GPT-2 style files. Throws DataError naming the file, line/offset and what was expected.
  static ByteLevelBpe from_files(const std::string& encoder_json_path,
                                 const std::string& vocab_bpe_path,
                                 const std::string& eos_token = "<|endoftext|>");

  /// Builds from already-parsed tables; `merges` are pairs of symbols in byte-to-unicode form.
  ByteLevelBpe(std::unordered_map<std::string, int32_t> encoder,
               std::vector<std::pair<std::string, std::string>> merges,
               std::string eos_token);

  ByteLevelBpe(ByteLevelBpe&&) noexcept;
  ByteLevelBpe& operator=(ByteLevelBpe&&) noexcept;
  ~ByteLevelBpe();

  std::vector<int32_t> encode(std::string_view text) const;
  /// Concatenates the bytes of the ids (special tokens included verbatim). Throws DataError on an
  /// id outside [0, vocab_size()).
  std::string decode(const std::vector<int32_t>& ids) const;
  int32_t vocab_size() const;  ///< max id + 1
  int32_t eos_id() const;      ///< id of the end-of-text token
  /// Token as raw bytes (for display and tests).
  std::string token_bytes(int32_t id) const;
  /// Stable 64-bit FNV-1a fingerprint of (encoder, merges, eos), as 16 hex digits.
  std::string fingerprint() const;
  /// Writes `encoder.json` and `vocab.bpe` (header `#version: 0.2`) into `dir`.
  void save_files(const std::string& dir) const;
  size_t num_merges() const;
  /// Token `id` in byte-to-unicode form (as encoder.json spells it).
  std::string token_symbols(int32_t id) const;
  /// Ranked merges in byte-to-unicode form.
  const std::vector<std::pair<std::string, std::string>>& merges() const;
  /// Replaces the pre-tokenizer (empty pattern: GPT-2's). The fingerprint then covers the pattern
  /// and flag; a GPT-2 pattern without ignore_merges keeps the fingerprint of the tables.
  void set_pretokenizer(const std::string& pattern, bool ignore_merges);
  const std::string& pattern() const;  ///< empty: GPT-2's
  bool ignore_merges() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Counts pre-tokens of a corpus, then learns merges (GPT-2 byte-level BPE training).
/// Determinism: ties in pair counts are broken by the smaller (left id, right id) pair, where
/// ids are the order in which symbols were created (bytes first in byte-to-unicode order).
class BpeTrainer {
 public:
  BpeTrainer();
  ~BpeTrainer();
  void add_text(std::string_view text);
  /// vocab_size counts the 256 byte symbols, the merges and the end-of-text token.
  /// Pre-tokens seen fewer than `min_frequency` times are ignored when counting pairs.
  ByteLevelBpe train(int32_t vocab_size, const std::string& eos_token = "<|endoftext|>",
                     int64_t min_frequency = 1) const;
  size_t num_unique_words() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// A tokenizer folder (see header comment) loaded by kind.
class Tokenizer {
 public:
  /// Reads `dir/tokenizer.json` and the files it names; DataError on anything malformed.
  static Tokenizer load(const std::string& dir);
  Tokenizer(std::string kind, ByteLevelBpe bpe);

  /// Writes tokenizer.json + encoder.json + vocab.bpe into `dir` (created if needed).
  void save(const std::string& dir) const;

  const std::string& kind() const { return kind_; }
  const ByteLevelBpe& bpe() const { return bpe_; }
  std::vector<int32_t> encode(std::string_view text) const { return bpe_.encode(text); }
  std::string decode(const std::vector<int32_t>& ids) const { return bpe_.decode(ids); }
  int32_t vocab_size() const { return bpe_.vocab_size(); }
  int32_t eos_id() const { return bpe_.eos_id(); }
  std::string fingerprint() const { return bpe_.fingerprint(); }

 private:
  std::string kind_;
  ByteLevelBpe bpe_;
};

/// A Hugging Face `tokenizer.json` of a byte-level BPE (model BPE; pre-tokenizer ByteLevel, or a
/// Split regex followed by ByteLevel without its regex; no byte fallback) as a MixDiff tokenizer
/// of kind hf_bpe. Added tokens join the encoder at their ids; ids below `vocab_size` that nothing
/// names become reserved tokens "<|reserved_N|>" (models pad their vocabulary). `eos` names the
/// end-of-text token (empty: the token with id `eos_id` when >= 0, else tokenizer_config.json's
/// eos_token). Added tokens keep their ids but, as every special token here, are never matched
/// whole in text (MixDiff's encoder produces no special token from text). What the reader cannot follow is
/// refused with DataError naming the file and field; a normalizer of NFC is accepted with a note
/// in `notes` (text already in NFC, which is most text, encodes identically).
Tokenizer read_hf_tokenizer(const std::string& tokenizer_json, const std::string& eos,
                            int64_t vocab_size, std::vector<std::string>* notes,
                            int64_t eos_id = -1);

/// Writes `tokenizer.json` (and tokenizer_config.json) for Hugging Face's `tokenizers` /
/// PreTrainedTokenizerFast: the same vocabulary, merges and pre-tokenizer; the end-of-text token
/// and, when `mask_token` is not empty, a mask token with id vocab_size() as special tokens.
void write_hf_tokenizer(const Tokenizer& tok, const std::string& dir, const std::string& mask_token);

/// The tokens of a (context, continuation) pair as lm-eval makes them: trailing spaces of the
/// context move to the continuation; the context's tokens are encode(context), the
/// continuation's those of encode(context + continuation) after them (encode(continuation) when
/// that leaves none). SFT pairs and likelihood requests are tokenised this way.
std::pair<std::vector<int32_t>, std::vector<int32_t>> encode_pair(const Tokenizer& tok,
                                                                  const std::string& context,
                                                                  const std::string& continuation);

}  // namespace mixdiff

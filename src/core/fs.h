// File helpers that keep work safe: atomic writes (temporary name, fsync, rename, fsync of the
// folder), content fingerprints, and read-only memory maps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace mixdiff {

/// Writes `data` to `path` atomically: a crash leaves either the old file or the new one.
/// Throws InputError naming the path and the OS error (e.g. "No space left on device").
void write_file_atomic(const std::string& path, std::string_view data);

/// fsync of a file or folder; throws InputError on failure.
void fsync_path(const std::string& path);

/// Whole file as a string; throws DataError naming `what` and the path when it cannot be read.
std::string read_file(const std::string& path, const std::string& what = "file");

/// FNV-1a 64 of a byte range / of a file's content, as 16 lowercase hex digits.
std::string fnv1a64_hex(const void* data, size_t n);
std::string fnv1a64_file(const std::string& path);

/// A read-only memory map of a whole file. Empty files map to {nullptr, 0}.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);  ///< throws DataError
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace mixdiff

#include "core/fs.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/errors.h"

namespace mixdiff {

namespace {
std::string os_error() { return std::strerror(errno); }

uint64_t fnv1a64_update(uint64_t h, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

std::string hex64(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}
}  // namespace

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw InputError(str(path, ": cannot open for fsync: ", os_error()));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL) {  // EINVAL: the filesystem does not sync folders
    errno = err;
    throw InputError(str(path, ": fsync failed: ", os_error()));
  }
}

void write_file_atomic(const std::string& path, std::string_view data) {
  namespace fs = std::filesystem;
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw InputError(str(tmp, ": cannot create: ", os_error()));
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    ssize_t w = ::write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      std::string err = os_error();
      ::close(fd);
      ::unlink(tmp.c_str());
      throw InputError(str(path, ": write failed: ", err));
    }
    p += w;
    left -= static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    std::string err = os_error();
    ::close(fd);
    ::unlink(tmp.c_str());
    throw InputError(str(path, ": fsync failed: ", err));
  }
  if (::close(fd) != 0) {
    std::string err = os_error();
    ::unlink(tmp.c_str());
    throw InputError(str(path, ": close failed: ", err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string err = os_error();
    ::unlink(tmp.c_str());
    throw InputError(str(path, ": rename failed: ", err));
  }
  fs::path parent = fs::path(path).parent_path();
  fsync_path(parent.empty() ? "." : parent.string());
}

std::string read_file(const std::string& path, const std::string& what) {
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) {
    throw DataError(str(path, ": cannot open ", what, ": file not found"));
  }
  if (std::filesystem::is_directory(st)) {
    throw DataError(str(path, ": cannot open ", what, ": is a directory"));
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) throw DataError(str(path, ": cannot open ", what, ": ", os_error()));
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw DataError(str(path, ": read error in ", what));
  return ss.str();
}

std::string fnv1a64_hex(const void* data, size_t n) {
  return hex64(fnv1a64_update(0xcbf29ce484222325ULL, static_cast<const uint8_t*>(data), n));
}

std::string fnv1a64_file(const std::string& path) {
  MappedFile m(path);
  return fnv1a64_hex(m.data(), m.size());
}

MappedFile::MappedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw DataError(str(path, ": cannot open: ", os_error()));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    std::string err = os_error();
    ::close(fd);
    throw DataError(str(path, ": cannot stat: ", err));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      std::string err = os_error();
      ::close(fd);
      throw DataError(str(path, ": cannot map: ", err));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::MappedFile(MappedFile&& o) noexcept : data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

}  // namespace mixdiff

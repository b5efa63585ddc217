// Atomic, durable file replacement and fsync (see file_io.h).
#include "framework/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "framework/error.h"

namespace loom {

namespace fs = std::filesystem;

void fsync_path(const fs::path& path) {
  std::error_code ec;
  bool directory = fs::is_directory(path, ec);
  int fd = ::open(path.c_str(), O_RDONLY | (directory ? O_DIRECTORY : 0) | O_CLOEXEC);
  LOOM_CHECK(fd >= 0) << "cannot open '" << path.string() << "' to fsync it: " << std::strerror(errno);
  int status = ::fsync(fd);
  int saved = errno;
  ::close(fd);
  // Some file systems cannot fsync a directory (EINVAL); its entries are then as durable as they get.
  LOOM_CHECK(status == 0 || (directory && (saved == EINVAL || saved == EROFS)))
      << "fsync of '" << path.string() << "' failed: " << std::strerror(saved);
}

void write_file_atomic(const fs::path& target, const void* data, size_t size) {
  std::string path = target.string();
  if (target.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(target.parent_path(), ec);
    LOOM_CHECK(!ec) << "cannot create directory " << target.parent_path().string() << " for " << path << ": "
                    << ec.message();
  }
  std::string tmp = path + ".tmp.XXXXXX";
  int fd = ::mkstemp(tmp.data());
  LOOM_CHECK(fd >= 0) << "cannot create a temp file beside " << path << ": " << std::strerror(errno);
  const auto* p = static_cast<const uint8_t*>(data);
  size_t done = 0;
  int err = 0;
  while (done < size) {
    ssize_t n = ::write(fd, p + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = errno;
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (err == 0 && ::fchmod(fd, 0644) != 0) err = errno;
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err == 0 && std::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    LOOM_FAIL() << "cannot write " << path << " (" << size << " bytes): " << std::strerror(err);
  }
  fsync_path(target.has_parent_path() ? target.parent_path() : fs::path("."));
}

}  // namespace loom

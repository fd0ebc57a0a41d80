// limoe/io/file.hpp: whole-file reading, read-only mapping, and atomic replacement of a file.
//
// read_file(path)            -> the bytes of a file, with errors that say which file and why (missing, a directory,
//                               unreadable).
// map_file(path)             -> a read-only view of a file's bytes; memory-mapped for regular files, read into
//                               memory otherwise (pipes, empty files). The mapping lives as long as any copy of the
//                               returned FileBytes.
// write_file_atomic(path, …) -> never leaves a half-written file at `path` (spec docs/cli.md section 3: "never leaves a
//                               half-written output file"): the bytes go to a temporary file in the same directory,
//                               `path + ".tmp.<pid>.<n>"`, which is flushed (fsync), then renamed over `path`. If
//                               anything fails (including an exception thrown by the writer callback), the
//                               temporary file is removed, the error is rethrown, and the old file at `path`, if
//                               any, is left untouched.
// write_files_atomic({{path, text}, …}) -> files that belong together: all staged before any is renamed.
//
// POSIX only (open/fsync/rename/mmap).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ios>
#include <memory>
#include <ostream>
#include <span>
#include <streambuf>
#include <string>
#include <string_view>
#include <vector>
#include <utility>

#include "limoe/core/error.hpp"

namespace limoe::io {

namespace detail {

inline std::string errno_text(int err) { return std::strerror(err); }

// Closes a file descriptor on scope exit unless released.
class FdGuard {
 public:
  explicit FdGuard(int fd = -1) : fd_(fd) {}
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  ~FdGuard() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now and reports close()'s errno (0 on success); close errors matter for written files (NFS, quotas).
  int close_now() {
    int err = 0;
    if (fd_ >= 0 && ::close(fd_) != 0) err = errno;
    fd_ = -1;
    return err;
  }

 private:
  int fd_;
};

// How long open_for_reading waits for a named pipe's writer to connect or write.
inline constexpr int kFifoWaitMs = 30000;

// Opens `path` read-only with the clear errors read_file promises; fills `st`. A regular file or a pipe: a
// device is refused before it is opened (/dev/zero would be read until memory runs out, a terminal until end of
// input, and opening some devices does something). A named pipe is opened without blocking and then waited on
// for at most kFifoWaitMs: a writer that connects later in that time is read as usual (a shell's `<(...)`, `cat
// x > pipe` started after limoe), one that never comes is an error naming the file instead of a command held
// forever.
inline int open_for_reading(const std::string& path, struct stat& st) {
  if (path.empty()) fail("cannot read file: the path is empty");
  struct stat pre {};
  const bool known = ::stat(path.c_str(), &pre) == 0, fifo = known && S_ISFIFO(pre.st_mode);
  if (known && !S_ISREG(pre.st_mode) && !fifo && !S_ISDIR(pre.st_mode))
    fail("cannot read '", path, "': it is a device or socket, not a file");
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (fifo ? O_NONBLOCK : 0));
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) fail("cannot read '", path, "': no such file");
    if (err == EACCES || err == EPERM) fail("cannot read '", path, "': permission denied");
    fail("cannot read '", path, "': ", errno_text(err));
  }
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail("cannot read '", path, "': fstat failed: ", errno_text(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail("cannot read '", path, "': it is a directory, not a file");
  }
  if (!S_ISREG(st.st_mode) && !S_ISFIFO(st.st_mode)) {  // replaced by a device since the stat above
    ::close(fd);
    fail("cannot read '", path, "': it is a device or socket, not a file");
  }
  if (fifo) {
    // Linux reports POLLIN once a writer has written and POLLHUP once one has connected and closed; with no
    // writer yet, neither, so poll waits.
    struct pollfd p {fd, POLLIN, 0};
    int ready;
    do {
      ready = ::poll(&p, 1, kFifoWaitMs);
    } while (ready < 0 && errno == EINTR);
    if (ready <= 0) {
      ::close(fd);
      fail("cannot read '", path, "': it is a named pipe, and nothing wrote to it within ", kFifoWaitMs / 1000, " s");
    }
    if (const int flags = ::fcntl(fd, F_GETFL); flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) {
      const int err = errno;
      ::close(fd);
      fail("cannot read '", path, "': fcntl failed: ", errno_text(err));
    }
  }
  return fd;
}

// Reads fd to its end (works for pipes and files whose size changes), appending to `out`.
inline void read_all(int fd, const std::string& path, std::vector<std::uint8_t>& out, std::size_t size_hint) {
  out.clear();
  out.resize(size_hint > 0 ? size_hint : 4096);
  std::size_t used = 0;
  for (;;) {
    if (used == out.size()) out.resize(out.size() * 2);
    const ssize_t got = ::read(fd, out.data() + used, out.size() - used);
    if (got < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      if (err == EISDIR) fail("cannot read '", path, "': it is a directory, not a file");
      fail("cannot read '", path, "': read failed: ", errno_text(err));
    }
    if (got == 0) break;
    used += static_cast<std::size_t>(got);
  }
  out.resize(used);
}

// An ostream buffer over a file descriptor; write errors throw limoe::Error (errno in the message).
class FdStreamBuf : public std::streambuf {
 public:
  FdStreamBuf(int fd, std::string what) : fd_(fd), what_(std::move(what)) { setp(buf_, buf_ + sizeof(buf_)); }
  ~FdStreamBuf() override = default;

  // Writes everything buffered; throws on error.
  void flush_all() {
    write_raw(pbase(), static_cast<std::size_t>(pptr() - pbase()));
    setp(buf_, buf_ + sizeof(buf_));
  }

 protected:
  int_type overflow(int_type ch) override {
    flush_all();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(ch);
      pbump(1);
    }
    return traits_type::not_eof(ch);
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    if (n <= 0) return 0;
    const auto room = epptr() - pptr();
    if (n <= room) {
      std::memcpy(pptr(), s, static_cast<std::size_t>(n));
      pbump(static_cast<int>(n));
      return n;
    }
    flush_all();
    write_raw(s, static_cast<std::size_t>(n));  // large writes go straight to the file
    return n;
  }
  int sync() override {
    flush_all();
    return 0;
  }

 private:
  void write_raw(const char* p, std::size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write ", what_, ": ", errno_text(errno));
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }

  int fd_;
  std::string what_;
  char buf_[1 << 16];
};

inline std::string temp_path_for(const std::string& path) {
  static std::atomic<unsigned long> counter{0};
  return path + ".tmp." + std::to_string(static_cast<long>(::getpid())) + "." + std::to_string(counter++);
}

inline std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace detail

// The whole content of a file. Throws limoe::Error naming the file: missing, a directory, unreadable.
inline std::vector<std::uint8_t> read_file(const std::string& path) {
  struct stat st {};
  detail::FdGuard fd(detail::open_for_reading(path, st));
  std::vector<std::uint8_t> out;
  const std::size_t hint = S_ISREG(st.st_mode) && st.st_size > 0 ? static_cast<std::size_t>(st.st_size) + 1 : 0;
  detail::read_all(fd.get(), path, out, hint);
  return out;
}

// Read-only bytes of a file: a private read-only memory map, or an owned buffer. Cheap to copy (shared).
class FileBytes {
 public:
  FileBytes() = default;
  explicit FileBytes(std::vector<std::uint8_t> bytes) {
    auto owned = std::make_shared<std::vector<std::uint8_t>>(std::move(bytes));
    data_ = owned->data();
    size_ = owned->size();
    owner_ = std::move(owned);
  }

  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::span<const std::uint8_t> span() const { return {data_, size_}; }
  bool mapped() const { return mapped_; }

 private:
  friend FileBytes map_file(const std::string& path);

  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  std::shared_ptr<const void> owner_;
  bool mapped_ = false;
};

// Maps a regular file read-only (falls back to reading it for other kinds of file). Same errors as read_file.
// Note: like any memory map, the bytes stay valid only while nobody truncates the file in place; files written with
// write_file_atomic are replaced by rename, which leaves existing maps of the old file intact.
inline FileBytes map_file(const std::string& path) {
  struct stat st {};
  detail::FdGuard fd(detail::open_for_reading(path, st));
  if (S_ISREG(st.st_mode) && st.st_size > 0) {
    const auto size = static_cast<std::size_t>(st.st_size);
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (p != MAP_FAILED) {
      FileBytes fb;
      fb.data_ = static_cast<const std::uint8_t*>(p);
      fb.size_ = size;
      fb.owner_ = std::shared_ptr<const void>(p, [size](const void* q) { ::munmap(const_cast<void*>(q), size); });
      fb.mapped_ = true;
      return fb;
    }
    // mmap can fail on some file systems; reading works everywhere.
  }
  std::vector<std::uint8_t> out;
  detail::read_all(fd.get(), path, out, S_ISREG(st.st_mode) ? static_cast<std::size_t>(st.st_size) + 1 : 0);
  return FileBytes(std::move(out));
}

namespace detail {
// A file to replace `path`: nothing there yet, or a regular file (through a symbolic link too: the link is then
// replaced, not its target). A directory, a device, a pipe or a socket is refused: the rename would put a
// regular file in its place (`--output /dev/null` run as root would replace the device).
inline void check_replaceable(const std::string& path) {
  if (path.empty()) fail("cannot write file: the path is empty");
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) fail("cannot write '", path, "': it is a directory, not a file");
  if (!S_ISREG(st.st_mode))
    fail("cannot write '", path, "': it is not a regular file (a device, pipe or socket), and limoe writes a new "
         "file and renames it over the old one");
}

// Writes `writer`'s content to a new temporary file beside `path`, fsync'ed and closed, and returns its name; on
// any failure the temporary file is removed and the error propagates.
inline std::string stage_file(const std::string& path, const std::function<void(std::ostream&)>& writer) {
  check_replaceable(path);
  const std::string tmp = temp_path_for(path);
  int raw;
  do {
    raw = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  } while (raw < 0 && errno == EINTR);
  if (raw < 0) {
    const int err = errno;
    fail("cannot write '", path, "': cannot create the temporary file '", tmp, "': ", errno_text(err));
  }
  FdGuard fd(raw);
  try {
    {
      FdStreamBuf buf(fd.get(), "'" + path + "' (temporary file '" + tmp + "')");
      std::ostream os(&buf);
      os.exceptions(std::ios_base::badbit | std::ios_base::failbit);
      try {
        writer(os);
        buf.flush_all();
      } catch (const std::ios_base::failure& e) {
        fail("cannot write '", path, "': stream error: ", e.what());
      }
    }
    if (::fsync(fd.get()) != 0) {
      const int err = errno;
      fail("cannot write '", path, "': fsync failed: ", errno_text(err));
    }
    if (const int err = fd.close_now(); err != 0) fail("cannot write '", path, "': close failed: ", errno_text(err));
  } catch (...) {
    fd.close_now();
    ::unlink(tmp.c_str());
    throw;
  }
  return tmp;
}

// Renames a staged file over `path` (removing it if that fails), then makes the rename durable (best effort:
// some file systems refuse fsync on directories).
inline void commit_file(const std::string& tmp, const std::string& path) {
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail("cannot write '", path, "': rename from '", tmp, "' failed: ", errno_text(err));
  }
  const std::string dir = parent_dir(path);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}
}  // namespace detail

// Writes `path` atomically: `writer(os)` streams the content into a temporary file next to `path`, which is fsync'ed
// and renamed over `path`. On any failure (I/O error, or an exception thrown by `writer`) the temporary file is
// removed and the exception propagates; an existing file at `path` is then left as it was. Write errors raised by the
// stream throw limoe::Error at once (the stream has badbit exceptions enabled).
inline void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& writer) {
  detail::commit_file(detail::stage_file(path, writer), path);
}

// Several files that belong together (a report and its picture): every file staged (its target checked first),
// and only then renamed over its target, in order. A failure while staging (a folder in the way, a full disk)
// removes the files staged before it and leaves every target as it was; only a failing rename after the first
// could leave the files of the two writes side by side.
inline void write_files_atomic(const std::vector<std::pair<std::string, std::string_view>>& files) {
  std::vector<std::string> staged;
  try {
    for (const auto& [path, text] : files)
      staged.push_back(detail::stage_file(path, [&text = text](std::ostream& os) {
        os.write(text.data(), static_cast<std::streamsize>(text.size()));
      }));
  } catch (...) {
    for (const auto& t : staged) ::unlink(t.c_str());
    throw;
  }
  for (std::size_t i = 0; i < files.size(); ++i) {
    try {
      detail::commit_file(staged[i], files[i].first);
    } catch (...) {
      for (std::size_t j = i + 1; j < staged.size(); ++j) ::unlink(staged[j].c_str());
      throw;
    }
  }
}

inline void write_file_atomic(const std::string& path, std::span<const std::uint8_t> bytes) {
  write_file_atomic(path, [&](std::ostream& os) {
    os.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  });
}

inline void write_file_atomic(const std::string& path, std::string_view text) {
  write_file_atomic(path, [&](std::ostream& os) { os.write(text.data(), static_cast<std::streamsize>(text.size())); });
}

}  // namespace limoe::io

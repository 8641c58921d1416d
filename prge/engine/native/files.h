// Files for the native trainer: errors, reading, atomic writes (temp + fsync + rename, folders swapped
// whole, as prge/io.py), and the process's clock and peak memory.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace prge {

// every error ends the run with one line "prge-native-train: error: <what>"; code 2 = bad arguments
struct Fail : std::runtime_error {
  int code;
  explicit Fail(const std::string& m, int c = 1) : std::runtime_error(m), code(c) {}
};
[[noreturn]] inline void fail(const std::string& m) { throw Fail(m); }

bool exists(const std::string& path);
bool is_dir(const std::string& path);
std::string read_file(const std::string& path, const std::string& what);  // `what` names it in errors
void mkdirs(const std::string& path);
void rmtree(const std::string& path);

void atomic_write(const std::string& path, const std::string& data);
// the same for a file written from parts that lie elsewhere (a checkpoint's state straight from the
// program's arena), so the file is never assembled in memory
struct Bytes {
  const void* data;
  size_t size;
};
void atomic_write(const std::string& path, const std::vector<Bytes>& parts);
// a fresh temp folder beside `path`; commit_dir swaps it in whole (prge.io.atomic_dir)
std::string temp_dir_beside(const std::string& path);
void commit_dir(const std::string& tmp, const std::string& path);
void append_line(const std::string& path, const std::string& line);

double peak_rss_mb();  // VmHWM of this process
double rss_mb();       // VmRSS of this process, now
// what the resident memory is, now: anonymous (heap: packed weights, planned arenas, data, runtime),
// file-backed (libraries and the memory-mapped program), and the part of that which is `mapped_file`
struct RssParts {
  double anon_mb = -1, file_mb = -1, mapped_file_mb = 0;
};
RssParts rss_parts(const std::string& mapped_file);
double now();          // seconds, monotonic

}  // namespace prge

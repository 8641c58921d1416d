#include "files.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

namespace prge {
namespace {

std::string dirname_of(const std::string& p) {
  auto k = p.find_last_of('/');
  return k == std::string::npos ? "." : (k == 0 ? "/" : p.substr(0, k));
}

std::string basename_of(const std::string& p) {
  auto k = p.find_last_of('/');
  return k == std::string::npos ? p : p.substr(k + 1);
}

void fsync_path(const std::string& p, bool dir) {
  int fd = open(p.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;
  fsync(fd);
  close(fd);
}

mode_t current_umask() {
  mode_t mask = umask(0);
  umask(mask);
  return mask;
}

std::string errno_text() { return strerror(errno); }

}  // namespace

bool exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

bool is_dir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string read_file(const std::string& path, const std::string& what) {
  if (!exists(path)) fail(what + " " + path + " not found");
  if (is_dir(path)) fail(what + " " + path + " is a folder, not a file");
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) fail("cannot read " + what + " " + path);
  std::streamoff size = f.tellg();  // -1 for what has no size (a pipe): named as unreadable, not a bad_alloc
  if (size < 0) fail("cannot read " + what + " " + path + " (not a regular file)");
  std::string out(size_t(size), '\0');  // read in place: a stringstream's str() would hold the file twice
  f.seekg(0);
  if (!f.read(out.data(), std::streamsize(out.size()))) fail("cannot read " + what + " " + path);
  return out;
}

void mkdirs(const std::string& p) {
  if (p.empty() || is_dir(p)) return;
  mkdirs(dirname_of(p));
  if (mkdir(p.c_str(), 0777) != 0 && !is_dir(p)) fail("cannot create folder " + p + " (" + errno_text() + ")");
}

void rmtree(const std::string& p) {
  struct stat st;
  if (lstat(p.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    if (DIR* d = opendir(p.c_str())) {
      while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") rmtree(p + "/" + n);
      }
      closedir(d);
    }
    rmdir(p.c_str());
  } else {
    unlink(p.c_str());
  }
}

void atomic_write(const std::string& path, const std::string& data) { atomic_write(path, std::vector<Bytes>{{data.data(), data.size()}}); }

void atomic_write(const std::string& path, const std::vector<Bytes>& parts) {
  std::string dir = dirname_of(path);
  mkdirs(dir);
  std::string tmpl = dir + "/." + basename_of(path) + ".XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  int fd = mkstemp(buf.data());
  if (fd < 0) fail("cannot write in " + dir + " (" + errno_text() + ")");
  std::string tmp(buf.data());
  bool ok = true;
  for (const Bytes& part : parts) {
    const char* p = static_cast<const char*>(part.data);
    size_t off = 0;
    while (ok && off < part.size) {
      ssize_t n = write(fd, p + off, part.size - off);
      if (n <= 0) ok = false;
      else off += size_t(n);
    }
  }
  ok = ok && fsync(fd) == 0 && fchmod(fd, 0666 & ~current_umask()) == 0;
  ok = (close(fd) == 0) && ok;
  if (!ok || rename(tmp.c_str(), path.c_str()) != 0) {
    std::string err = errno_text();
    unlink(tmp.c_str());
    fail("cannot write " + path + " (" + err + ")");
  }
  fsync_path(dir, true);
}

std::string temp_dir_beside(const std::string& path) {
  std::string parent = dirname_of(path);
  mkdirs(parent);
  std::string tmpl = parent + "/." + basename_of(path) + ".XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) fail("cannot create a folder in " + parent + " (" + errno_text() + ")");
  return buf.data();
}

void commit_dir(const std::string& tmp, const std::string& path) {
  fsync_path(tmp, true);
  chmod(tmp.c_str(), 0777 & ~current_umask());
  std::string old = path + ".old";
  if (exists(path)) {
    if (exists(old)) rmtree(old);
    if (rename(path.c_str(), old.c_str()) != 0) { rmtree(tmp); fail("cannot replace " + path + " (" + errno_text() + ")"); }
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) { rmtree(tmp); fail("cannot replace " + path + " (" + errno_text() + ")"); }
  fsync_path(dirname_of(path), true);
  rmtree(old);
}

void append_line(const std::string& path, const std::string& line) {
  FILE* f = fopen(path.c_str(), "a");
  if (!f) fail("cannot append to " + path + " (" + errno_text() + ")");
  fputs((line + "\n").c_str(), f);
  if (fclose(f) != 0) fail("cannot write " + path);
}

static double status_mb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  size_t n = strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, n, key) == 0) return std::strtod(line.c_str() + n, nullptr) / 1024.0;
  return -1;
}

// VmHWM, not ru_maxrss: ru_maxrss would carry a parent's peak across exec
double peak_rss_mb() {
  double hwm = status_mb("VmHWM:");
  if (hwm >= 0) return hwm;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;
}

double rss_mb() { return status_mb("VmRSS:"); }

RssParts rss_parts(const std::string& mapped_file) {
  RssParts p;
  p.anon_mb = status_mb("RssAnon:");
  p.file_mb = status_mb("RssFile:");
  char* real = realpath(mapped_file.c_str(), nullptr);
  std::string want = real ? real : mapped_file;
  free(real);
  std::ifstream f("/proc/self/smaps");
  std::string line;
  bool mine = false;
  while (std::getline(f, line)) {
    if (line.compare(0, 4, "Rss:") == 0) {
      if (mine) p.mapped_file_mb += std::strtod(line.c_str() + 4, nullptr) / 1024.0;
    } else if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) && line.find('-') != std::string::npos &&
               line.find(':') > line.find(' ')) {  // a mapping's header: "start-end perms offset dev inode [path]"
      size_t slash = line.find('/');
      mine = slash != std::string::npos && line.compare(slash, std::string::npos, want) == 0;
    }
  }
  return p;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace prge

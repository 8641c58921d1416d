#include "sha256.h"

#include <fcntl.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <vector>

#include "files.h"
#include "safetensors.h"

#ifdef PRGE_HAVE_OPENSSL
#include <openssl/evp.h>
#endif

namespace prge {

#ifdef PRGE_HAVE_OPENSSL
namespace {

struct Digest {
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx{EVP_MD_CTX_new(), EVP_MD_CTX_free};
  Digest() {
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) fail("OpenSSL cannot start a SHA-256");
  }
  void update(const void* p, size_t n) { EVP_DigestUpdate(ctx.get(), p, n); }
  std::string hex() {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx.get(), md, &n);
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < n; ++i) {
      out += digits[md[i] >> 4];
      out += digits[md[i] & 15];
    }
    return out;
  }
};

// torch's names for the safetensors dtypes (what prge.io.tensors_sha256 hashes)
std::string torch_dtype(const std::string& st) {
  static const std::pair<const char*, const char*> names[] = {
      {"F64", "torch.float64"}, {"F32", "torch.float32"}, {"F16", "torch.float16"}, {"BF16", "torch.bfloat16"},
      {"I64", "torch.int64"},   {"I32", "torch.int32"},   {"I16", "torch.int16"},   {"I8", "torch.int8"},
      {"U8", "torch.uint8"},    {"BOOL", "torch.bool"}};
  for (auto& [a, b] : names)
    if (st == a) return b;
  return st;
}

// a Python tuple's repr: (), (5,), (3, 4)
std::string shape_repr(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

}  // namespace

bool hashing_available() { return true; }

std::string sha256_file(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(fopen(path.c_str(), "rb"), fclose);
  if (!f) fail("cannot read " + path);
  Digest d;
  std::vector<char> block(1 << 20);
  size_t n;
  while ((n = fread(block.data(), 1, block.size(), f.get())) > 0) d.update(block.data(), n);
  if (ferror(f.get())) fail("cannot read " + path);
  // read once to hash: do not leave the whole file in the page cache, where every page a run then touches
  // in its memory-mapped copy would bring its cached neighbours into the run's resident set (fault-around)
  posix_fadvise(fileno(f.get()), 0, 0, POSIX_FADV_DONTNEED);
  return d.hex();
}

std::string tensors_sha256(std::vector<HashedTensor> tensors) {
  std::sort(tensors.begin(), tensors.end(), [](auto& a, auto& b) { return a.name < b.name; });  // as Python's sorted()
  Digest d;
  for (auto& t : tensors) {
    std::string head = t.name + "|" + torch_dtype(t.dtype) + "|" + shape_repr(t.shape) + "|";
    d.update(head.data(), head.size());
    d.update(t.data, t.bytes);
  }
  return d.hex();
}

#else

bool hashing_available() { return false; }
std::string sha256_file(const std::string&) { return ""; }
std::string tensors_sha256(std::vector<HashedTensor>) { return ""; }

#endif

std::string tensors_sha256(const SafetensorsFile& f) {
  std::vector<HashedTensor> ts;
  for (auto& [name, t] : f.tensors) ts.push_back({name, t.dtype, t.shape, f.bytes.data() + f.payload + t.begin, t.end - t.begin});
  return tensors_sha256(std::move(ts));
}

void check_tensors_hash(const SafetensorsFile& f, const std::string& what) {
  auto it = f.metadata.find("prge_sha256");
  if (!hashing_available() || it == f.metadata.end() || !it->is_string()) return;
  if (tensors_sha256(f) != it->get<std::string>())
    fail(what + " " + f.path + " is damaged: its SHA-256 differs from the one recorded when it was written");
}

}  // namespace prge

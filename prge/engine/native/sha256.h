// SHA-256 with OpenSSL's libcrypto (EVP), the same digests prge/io.py records: a program's SHA-256
// (its manifest's program_sha256) and the SHA-256 of a safetensors file's tensors ("prge_sha256" in
// its metadata, prge.io.tensors_sha256). The ARM64 cross build links the target's static libcrypto.a,
// extracted from Debian's libssl-dev:arm64 (native.py _target_openssl). A build without OpenSSL has
// hashing_available() == false and checks sizes and shapes only, and its --help says so.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace prge {

struct SafetensorsFile;

// one tensor as prge.io.tensors_sha256 hashes it: name, safetensors dtype, shape, bytes
struct HashedTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  const void* data;
  size_t bytes;
};

bool hashing_available();
std::string sha256_file(const std::string& path);             // hex; fails naming the file if unreadable
std::string tensors_sha256(const SafetensorsFile& f);          // hex, as prge.io.tensors_sha256
std::string tensors_sha256(std::vector<HashedTensor> tensors);  // the same, of tensors in memory
// refuse a file whose tensors' hash differs from its recorded "prge_sha256" (files without one pass)
void check_tensors_hash(const SafetensorsFile& f, const std::string& what);

}  // namespace prge

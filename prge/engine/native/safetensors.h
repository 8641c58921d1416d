// safetensors files (an 8-byte little-endian header length, a JSON header, raw little-endian tensors):
// the data file, the step plan and the checkpoints. https://github.com/huggingface/safetensors
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace prge {

struct TensorInfo {
  std::string dtype;  // "F32", "I32", "I64", ...
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;  // byte offsets into the payload
  int64_t numel() const;
};

struct SafetensorsFile {
  std::string path, bytes;
  size_t payload = 0;  // offset of the tensors in `bytes`
  std::map<std::string, TensorInfo> tensors;
  nlohmann::json metadata = nlohmann::json::object();  // "__metadata__": string -> string

  const TensorInfo* find(const std::string& name) const;
  std::vector<int64_t> ints(const std::string& name) const;  // an I32 or I64 tensor, widened
  std::vector<float> floats(const std::string& name) const;  // an F32 tensor
};

// the whole file; `what` names it in errors ("data file", "plan file", "checkpoint")
SafetensorsFile read_safetensors(const std::string& path, const std::string& what);

// a float32 tensor of shape (n,) to write, over memory that stays valid until written
struct NamedFloats {
  std::string name;
  const float* data;
  size_t n;
  NamedFloats(std::string name, const float* data, size_t n) : name(std::move(name)), data(data), n(n) {}
  NamedFloats(std::string name, const std::vector<float>& v) : NamedFloats(std::move(name), v.data(), v.size()) {}
};
// write a safetensors file atomically, its tensors straight from where they lie (never copied into one
// buffer: a checkpoint's 76 MB state would otherwise be held two or three times at the run's peak)
void write_safetensors(const std::string& path, const std::vector<NamedFloats>& tensors);

}  // namespace prge

#include "safetensors.h"

#include <cstring>

#include "files.h"
#include "sha256.h"

namespace prge {

using nlohmann::json;

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors.find(name);
  return it == tensors.end() ? nullptr : &it->second;
}

std::vector<int64_t> SafetensorsFile::ints(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) fail(path + ": tensor " + name + " is missing");
  std::vector<int64_t> out(size_t(t->numel()));
  const char* p = bytes.data() + payload + t->begin;
  if (t->dtype == "I32") {
    for (size_t i = 0; i < out.size(); ++i) {
      int32_t v;
      memcpy(&v, p + 4 * i, 4);
      out[i] = v;
    }
  } else if (t->dtype == "I64") {
    memcpy(out.data(), p, out.size() * 8);
  } else {
    fail(path + ": tensor " + name + " is " + t->dtype + ", expected an integer tensor");
  }
  return out;
}

std::vector<float> SafetensorsFile::floats(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) fail(path + ": tensor " + name + " is missing");
  if (t->dtype != "F32") fail(path + ": tensor " + name + " is " + t->dtype + ", expected F32");
  std::vector<float> out(size_t(t->numel()));
  memcpy(out.data(), bytes.data() + payload + t->begin, out.size() * 4);
  return out;
}

namespace {

size_t item_size(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  return 1;
}

}  // namespace

SafetensorsFile read_safetensors(const std::string& path, const std::string& what) {
  SafetensorsFile f;
  f.path = path;
  f.bytes = read_file(path, what);
  const std::string& b = f.bytes;
  std::string name = what + " " + path;
  if (b.size() < 8) fail(name + " is not a safetensors file (too short)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(b[size_t(i)]);
  if (n > b.size() - 8 || n > (100u << 20)) fail(name + " is not a safetensors file (bad header length)");
  f.payload = 8 + size_t(n);
  json header = json::parse(b.begin() + 8, b.begin() + 8 + std::ptrdiff_t(n), nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) fail(name + " is not a safetensors file (the header is not valid JSON)");
  if (!header.is_object()) fail(name + ": the header is not a JSON object");
  size_t size = b.size() - f.payload;
  for (auto& [key, entry] : header.items()) {
    if (key == "__metadata__") {
      f.metadata = entry;
      continue;
    }
    TensorInfo t;
    try {
      t.dtype = entry.at("dtype").get<std::string>();
      t.shape = entry.at("shape").get<std::vector<int64_t>>();
      auto off = entry.at("data_offsets").get<std::vector<size_t>>();
      if (off.size() != 2) throw std::runtime_error("data_offsets");
      t.begin = off[0];
      t.end = off[1];
    } catch (const std::exception&) {
      fail(name + ": bad header entry for " + key);
    }
    for (auto d : t.shape)
      if (d < 0) fail(name + ": bad shape for " + key);
    if (t.end < t.begin || t.end > size || t.end - t.begin != size_t(t.numel()) * item_size(t.dtype))
      fail(name + " is truncated or corrupt (tensor " + key + " lies outside the file)");
    f.tensors[key] = t;
  }
  check_tensors_hash(f, what);
  return f;
}

void write_safetensors(const std::string& path, const std::vector<NamedFloats>& tensors) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::vector<HashedTensor> hashed;
  std::vector<Bytes> parts(1);  // parts[0]: length and header, set below
  size_t off = 0;
  for (auto& t : tensors) {
    size_t n = t.n * 4;
    header[t.name] = {{"dtype", "F32"}, {"shape", {t.n}}, {"data_offsets", {off, off + n}}};
    hashed.push_back({t.name, "F32", {int64_t(t.n)}, t.data, n});
    parts.push_back({t.data, n});
    off += n;
  }
  if (hashing_available()) header["__metadata__"]["prge_sha256"] = tensors_sha256(std::move(hashed));  // as prge.io.save_tensors
  std::string h = header.dump();
  while ((8 + h.size()) % 8) h += ' ';  // the tensors start 8-byte aligned
  std::string head(8, '\0');
  uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) head[size_t(i)] = char((len >> (8 * i)) & 0xFF);
  head += h;
  parts[0] = {head.data(), head.size()};
  atomic_write(path, parts);
}

}  // namespace prge

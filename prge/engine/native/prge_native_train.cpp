// prge-native-train: the P-RGE device loop (prge/engine/runtime.py's device_train) in C++, linking only the
// ExecuTorch runtime, its optimized kernels and the XNNPACK backend from the executorch pip wheel.
//
//   prge-native-train --program X.pte --data D.safetensors --plan P.safetensors --out DIR
//                     --steps N --lr LR --eps EPS [--seed S] [--eval-every E] [--checkpoint-every C] [--normalize]
//                     [--lr-schedule constant|linear|cosine] [--resume] [--stop-after K]
//
// Inputs: X.pte and its manifest X.pte.json (written together by `prge export`), the pre-tokenised
// data file (prge.engine.export.write_dataset) and the step plan (prge.engine.native.write_plan: the example
// indices of every step, which Python's seeded shuffles pick). Outputs, in DIR (as device_train,
// except that B is written flat and `prge.engine.native` turns it into PEFT adapters):
//   metrics.jsonl                      one row per step and per evaluation
//   checkpoints/last|best/             state.safetensors {raw, g}, trainer_state.json, b.safetensors {b}
//   final_b.safetensors                {b (total,), g (q,)}: the clean B after the last step
//   native.json                        steps, seconds, mean step seconds, peak RSS, dev accuracies
// Every file is written atomically (temp + fsync + rename; folders swapped whole). Any error: one
// line "prge-native-train: error: ..." on stderr and exit status 1 (2 for bad arguments).
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;

namespace {

struct Fail : std::runtime_error {
  int code;
  explicit Fail(const std::string& m, int c = 1) : std::runtime_error(m), code(c) {}
};

[[noreturn]] void fail(const std::string& m) { throw Fail(m); }

// ---------------------------------------------------------------------------------------------
// a minimal JSON reader (objects, arrays, strings, numbers, true/false/null): enough for the
// safetensors header, the manifest and trainer_state.json

struct Json {
  enum Kind { Null, Bool, Num, Str, Arr, Obj } kind = Null;
  bool b = false;
  double num = 0;
  std::string text;  // a string's value, or a number's literal text
  std::vector<Json> arr;
  std::vector<std::pair<std::string, Json>> obj;

  const Json* get(const std::string& k) const {
    for (auto& kv : obj)
      if (kv.first == k) return &kv.second;
    return nullptr;
  }
  // canonical text (for comparing identity fields)
  std::string dump() const {
    switch (kind) {
      case Null: return "null";
      case Bool: return b ? "true" : "false";
      case Num: {
        char buf[64];
        snprintf(buf, sizeof buf, "%.17g", num);
        return buf;
      }
      case Str: return "\"" + text + "\"";
      case Arr: {
        std::string s = "[";
        for (size_t i = 0; i < arr.size(); ++i) s += (i ? "," : "") + arr[i].dump();
        return s + "]";
      }
      case Obj: {
        std::string s = "{";
        for (size_t i = 0; i < obj.size(); ++i) s += (i ? "," : "") + ("\"" + obj[i].first + "\":") + obj[i].second.dump();
        return s + "}";
      }
    }
    return "";
  }
};

struct JsonParser {
  const std::string& s;
  size_t i = 0;
  explicit JsonParser(const std::string& src) : s(src) {}
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) ++i;
  }
  [[noreturn]] void bad() { throw std::runtime_error("invalid JSON at offset " + std::to_string(i)); }
  std::string str() {
    if (s[i] != '"') bad();
    ++i;
    std::string out;
    while (i < s.size() && s[i] != '"') {
      if (s[i] == '\\') {
        if (++i >= s.size()) bad();
        char c = s[i];
        if (c == 'u') {
          if (i + 4 >= s.size()) bad();
          unsigned cp = std::stoul(s.substr(i + 1, 4), nullptr, 16);
          i += 4;
          if (cp < 0x80) out += char(cp);
          else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
          else { out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F)); }
        } else {
          out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c == 'b' ? '\b' : c == 'f' ? '\f' : c;
        }
        ++i;
      } else {
        out += s[i++];
      }
    }
    if (i >= s.size()) bad();
    ++i;
    return out;
  }
  Json value(int depth = 0) {
    if (depth > 64) bad();
    ws();
    if (i >= s.size()) bad();
    Json v;
    char c = s[i];
    if (c == '{') {
      v.kind = Json::Obj;
      ++i;
      ws();
      if (i < s.size() && s[i] == '}') { ++i; return v; }
      for (;;) {
        ws();
        if (i >= s.size()) bad();
        std::string k = str();
        ws();
        if (i >= s.size() || s[i] != ':') bad();
        ++i;
        v.obj.emplace_back(k, value(depth + 1));
        ws();
        if (i < s.size() && s[i] == ',') { ++i; continue; }
        if (i < s.size() && s[i] == '}') { ++i; return v; }
        bad();
      }
    }
    if (c == '[') {
      v.kind = Json::Arr;
      ++i;
      ws();
      if (i < s.size() && s[i] == ']') { ++i; return v; }
      for (;;) {
        v.arr.push_back(value(depth + 1));
        ws();
        if (i < s.size() && s[i] == ',') { ++i; continue; }
        if (i < s.size() && s[i] == ']') { ++i; return v; }
        bad();
      }
    }
    if (c == '"') { v.kind = Json::Str; v.text = str(); return v; }
    if (s.compare(i, 4, "true") == 0) { v.kind = Json::Bool; v.b = true; i += 4; return v; }
    if (s.compare(i, 5, "false") == 0) { v.kind = Json::Bool; i += 5; return v; }
    if (s.compare(i, 4, "null") == 0) { i += 4; return v; }
    if (s.compare(i, 3, "NaN") == 0) { v.kind = Json::Num; v.num = NAN; i += 3; return v; }
    size_t j = i;
    while (j < s.size() && strchr("+-0123456789.eE", s[j])) ++j;
    if (j == i) bad();
    v.kind = Json::Num;
    v.text = s.substr(i, j - i);
    v.num = strtod(v.text.c_str(), nullptr);
    i = j;
    return v;
  }
};

Json parse_json(const std::string& text, const std::string& what) {
  try {
    JsonParser p(text);
    Json v = p.value();
    p.ws();
    if (p.i != text.size()) p.bad();
    return v;
  } catch (const std::exception& e) {
    fail(what + " is not valid JSON (" + e.what() + ")");
  }
}

std::string jstr(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') { out += '\\'; out += c; }
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out + "\"";
}

std::string jnum(double x) {
  if (!std::isfinite(x)) return "NaN";
  char buf[64];
  snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// files

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
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot read " + what + " " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

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

void mkdirs(const std::string& p) {
  if (p.empty() || is_dir(p)) return;
  mkdirs(dirname_of(p));
  if (mkdir(p.c_str(), 0777) != 0 && !is_dir(p)) fail("cannot create folder " + p + " (" + strerror(errno) + ")");
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

// write `data` to `path` through a temp file beside it: write, fsync, rename, fsync the folder
void atomic_write(const std::string& path, const std::string& data) {
  std::string dir = dirname_of(path);
  mkdirs(dir);
  std::string tmpl = dir + "/." + basename_of(path) + ".XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  int fd = mkstemp(buf.data());
  if (fd < 0) fail("cannot write in " + dir + " (" + strerror(errno) + ")");
  std::string tmp(buf.data());
  size_t off = 0;
  bool ok = true;
  while (off < data.size()) {
    ssize_t n = write(fd, data.data() + off, data.size() - off);
    if (n <= 0) { ok = false; break; }
    off += size_t(n);
  }
  mode_t mask = umask(0);
  umask(mask);
  ok = ok && fsync(fd) == 0 && fchmod(fd, 0666 & ~mask) == 0;
  ok = (close(fd) == 0) && ok;
  if (!ok || rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    unlink(tmp.c_str());
    fail("cannot write " + path + " (" + strerror(err) + ")");
  }
  fsync_path(dir, true);
}

// a fresh temp folder beside `path`; commit_dir swaps it in whole (as prge.io.atomic_dir)
std::string temp_dir_beside(const std::string& path) {
  std::string parent = dirname_of(path);
  mkdirs(parent);
  std::string tmpl = parent + "/." + basename_of(path) + ".XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) fail("cannot create a folder in " + parent + " (" + strerror(errno) + ")");
  return buf.data();
}

void commit_dir(const std::string& tmp, const std::string& path) {
  fsync_path(tmp, true);
  mode_t mask = umask(0);
  umask(mask);
  chmod(tmp.c_str(), 0777 & ~mask);
  std::string old = path + ".old";
  if (exists(path)) {
    if (exists(old)) rmtree(old);
    if (rename(path.c_str(), old.c_str()) != 0) { rmtree(tmp); fail("cannot replace " + path + " (" + strerror(errno) + ")"); }
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) { rmtree(tmp); fail("cannot replace " + path + " (" + strerror(errno) + ")"); }
  fsync_path(dirname_of(path), true);
  rmtree(old);
}

// ---------------------------------------------------------------------------------------------
// safetensors

struct StTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

struct StFile {
  std::string path, bytes;
  size_t data_start = 0;
  std::map<std::string, StTensor> tensors;
  Json metadata;

  const StTensor* find(const std::string& k) const {
    auto it = tensors.find(k);
    return it == tensors.end() ? nullptr : &it->second;
  }
  template <class T>
  const T* data(const StTensor& t) const { return reinterpret_cast<const T*>(bytes.data() + data_start + t.begin); }

  // a copy as T (int32/int64 -> int64, float32 -> float)
  std::vector<int64_t> ints(const std::string& k) const {
    const StTensor* t = find(k);
    if (!t) fail(path + ": tensor " + k + " is missing");
    std::vector<int64_t> out(size_t(t->numel()));
    if (t->dtype == "I32") {
      const int32_t* p = data<int32_t>(*t);
      for (size_t i = 0; i < out.size(); ++i) out[i] = p[i];
    } else if (t->dtype == "I64") {
      memcpy(out.data(), data<int64_t>(*t), out.size() * 8);
    } else {
      fail(path + ": tensor " + k + " is " + t->dtype + ", expected an integer tensor");
    }
    return out;
  }
  std::vector<float> floats(const std::string& k) const {
    const StTensor* t = find(k);
    if (!t) fail(path + ": tensor " + k + " is missing");
    if (t->dtype != "F32") fail(path + ": tensor " + k + " is " + t->dtype + ", expected F32");
    std::vector<float> out(size_t(t->numel()));
    memcpy(out.data(), data<float>(*t), out.size() * 4);
    return out;
  }
};

StFile read_safetensors(const std::string& path, const std::string& what) {
  StFile f;
  f.path = path;
  f.bytes = read_file(path, what);
  const std::string& b = f.bytes;
  if (b.size() < 8) fail(what + " " + path + " is not a safetensors file (too short)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(b[size_t(i)]);
  if (n > b.size() - 8 || n > (100u << 20)) fail(what + " " + path + " is not a safetensors file (bad header length)");
  f.data_start = 8 + size_t(n);
  Json h = parse_json(b.substr(8, size_t(n)), what + " " + path + " (header)");
  if (h.kind != Json::Obj) fail(what + " " + path + ": the header is not a JSON object");
  size_t payload = b.size() - f.data_start;
  for (auto& kv : h.obj) {
    if (kv.first == "__metadata__") { f.metadata = kv.second; continue; }
    const Json* dt = kv.second.get("dtype");
    const Json* sh = kv.second.get("shape");
    const Json* off = kv.second.get("data_offsets");
    if (!dt || !sh || !off || dt->kind != Json::Str || sh->kind != Json::Arr || off->kind != Json::Arr || off->arr.size() != 2)
      fail(what + " " + path + ": bad header entry for " + kv.first);
    StTensor t;
    t.dtype = dt->text;
    for (auto& d : sh->arr) {
      if (d.kind != Json::Num || d.num < 0) fail(what + " " + path + ": bad shape for " + kv.first);
      t.shape.push_back(int64_t(d.num));
    }
    t.begin = size_t(off->arr[0].num);
    t.end = size_t(off->arr[1].num);
    size_t item = t.dtype == "F32" || t.dtype == "I32" ? 4 : t.dtype == "I64" || t.dtype == "F64" ? 8 : t.dtype == "F16" || t.dtype == "BF16" || t.dtype == "I16" ? 2 : 1;
    if (t.end < t.begin || t.end > payload || t.end - t.begin != size_t(t.numel()) * item)
      fail(what + " " + path + " is truncated or corrupt (tensor " + kv.first + " lies outside the file)");
    f.tensors[kv.first] = t;
  }
  return f;
}

struct OutTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string safetensors_bytes(const std::vector<OutTensor>& ts) {
  std::string h = "{\"__metadata__\":{\"format\":\"pt\"}";
  size_t off = 0;
  for (auto& t : ts) {
    h += "," + jstr(t.name) + ":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) h += (i ? "," : "") + std::to_string(t.shape[i]);
    h += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + t.bytes.size()) + "]}";
    off += t.bytes.size();
  }
  h += "}";
  while ((8 + h.size()) % 8) h += ' ';
  std::string out(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((n >> (8 * i)) & 0xFF);
  out += h;
  for (auto& t : ts) out += t.bytes;
  return out;
}

OutTensor f32(const std::string& name, const std::vector<float>& v) {
  return {name, "F32", {int64_t(v.size())}, std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4)};
}

// ---------------------------------------------------------------------------------------------
// the program

struct Program {
  std::unique_ptr<Module> mod;
  std::string path;

  std::vector<std::vector<int64_t>> input_shapes(const std::string& m) {
    auto meta = mod->method_meta(m);
    if (!meta.ok()) fail(path + " has no method " + m);
    std::vector<std::vector<int64_t>> out;
    for (size_t i = 0; i < meta->num_inputs(); ++i) {
      auto t = meta->input_tensor_meta(i);
      std::vector<int64_t> s;
      if (t.ok())
        for (auto d : t->sizes()) s.push_back(d);
      out.push_back(s);
    }
    return out;
  }
  std::vector<int64_t> output_shape(const std::string& m, size_t i) {
    auto meta = mod->method_meta(m);
    if (!meta.ok() || i >= meta->num_outputs()) fail(path + ": method " + m + " has no output " + std::to_string(i));
    auto t = meta->output_tensor_meta(i);
    std::vector<int64_t> s;
    if (t.ok())
      for (auto d : t->sizes()) s.push_back(d);
    return s;
  }
  // run a method; every output copied out as float (outputs alias the shared arenas)
  std::vector<std::vector<float>> run(const std::string& m, const std::vector<TensorPtr>& inputs) {
    std::vector<EValue> args;
    args.reserve(inputs.size());
    for (auto& t : inputs) args.emplace_back(*t);
    auto res = mod->execute(m, args);
    if (!res.ok()) fail("the runtime failed to run " + m + " of " + path + " (error " + std::to_string(int(res.error())) + ")");
    std::vector<std::vector<float>> out;
    for (auto& v : *res) {
      if (!v.isTensor()) fail(m + " returned a non-tensor output");
      auto t = v.toTensor();
      if (t.scalar_type() != ScalarType::Float) fail(m + " returned a non-float32 output");
      const float* p = t.const_data_ptr<float>();
      out.emplace_back(p, p + t.numel());
    }
    return out;
  }
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? "," : "") + std::to_string(s[i]);
  return o + (s.size() == 1 ? ",)" : ")");
}

TensorPtr f32t(std::vector<float>& v, std::vector<int32_t> shape) {
  return from_blob(v.data(), std::vector<executorch::aten::SizesType>(shape.begin(), shape.end()), ScalarType::Float);
}
TensorPtr i64t(std::vector<int64_t>& v, std::vector<int32_t> shape) {
  return from_blob(v.data(), std::vector<executorch::aten::SizesType>(shape.begin(), shape.end()), ScalarType::Long);
}

// ---------------------------------------------------------------------------------------------
// data

struct Split {
  int64_t n = 0;
  std::vector<int64_t> ids, pos, tids, label;
  std::vector<float> mask;
};

struct Rows {  // a batch in the program's input types
  std::vector<int64_t> ids, pos, tids, label;
  std::vector<float> mask;
};

Rows gather(const Split& s, const std::vector<int64_t>& idx, int64_t T, int64_t K) {
  Rows r;
  for (int64_t i : idx) {
    r.ids.insert(r.ids.end(), s.ids.begin() + i * T, s.ids.begin() + (i + 1) * T);
    r.pos.insert(r.pos.end(), s.pos.begin() + i * K, s.pos.begin() + (i + 1) * K);
    r.tids.insert(r.tids.end(), s.tids.begin() + i * K, s.tids.begin() + (i + 1) * K);
    r.mask.insert(r.mask.end(), s.mask.begin() + i * K, s.mask.begin() + (i + 1) * K);
    r.label.push_back(s.label[size_t(i)]);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// options

struct Options {
  std::string program, data, plan, out;
  long steps = -1, eval_every = 50, checkpoint_every = 25, stop_after = 0;
  double lr = NAN, eps = NAN;
  std::string lr_schedule = "constant";
  long long seed = 0;
  bool normalize = false, resume = false;
};

const char* USAGE =
    "usage: prge-native-train --program X.pte --data D.safetensors --plan P.safetensors --out DIR\n"
    "                         --steps N --lr LR --eps EPS [--seed S] [--eval-every E] [--checkpoint-every C] [--normalize]\n"
    "                         [--lr-schedule constant|linear|cosine] [--resume] [--stop-after K]\n";

Options parse_args(int argc, char** argv) {
  Options o;
  auto num = [&](int& i, const std::string& flag) -> std::string {
    if (i + 1 >= argc) throw Fail(flag + " needs a value", 2);
    return argv[++i];
  };
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--program") o.program = num(i, a);
      else if (a == "--data") o.data = num(i, a);
      else if (a == "--plan") o.plan = num(i, a);
      else if (a == "--out") o.out = num(i, a);
      else if (a == "--steps") o.steps = std::stol(num(i, a));
      else if (a == "--lr") o.lr = std::stod(num(i, a));
      else if (a == "--eps") o.eps = std::stod(num(i, a));
      else if (a == "--lr-schedule") o.lr_schedule = num(i, a);
      else if (a == "--seed") o.seed = std::stoll(num(i, a));
      else if (a == "--eval-every") o.eval_every = std::stol(num(i, a));
      else if (a == "--checkpoint-every") o.checkpoint_every = std::stol(num(i, a));
      else if (a == "--stop-after") o.stop_after = std::stol(num(i, a));
      else if (a == "--normalize") o.normalize = true;
      else if (a == "--resume") o.resume = true;
      else if (a == "-h" || a == "--help") { fputs(USAGE, stdout); exit(0); }
      else throw Fail("unknown argument " + a, 2);
    }
  } catch (const std::invalid_argument&) {
    throw Fail("a numeric option has a non-numeric value", 2);
  } catch (const std::out_of_range&) {
    throw Fail("a numeric option is out of range", 2);
  }
  if (o.program.empty() || o.data.empty() || o.plan.empty() || o.out.empty() || o.steps < 0 || std::isnan(o.lr) || std::isnan(o.eps))
    throw Fail("--program, --data, --plan, --out, --steps, --lr and --eps are required", 2);
  if (!(o.eps > 0) || o.eval_every < 0 || o.checkpoint_every < 0 || o.stop_after < 0)
    throw Fail("bad loop settings: pass --eps > 0, --eval-every >= 0, --checkpoint-every >= 0, --stop-after >= 0", 2);
  if (o.lr_schedule != "constant" && o.lr_schedule != "linear" && o.lr_schedule != "cosine")
    throw Fail("unknown --lr-schedule " + o.lr_schedule + " (constant, linear or cosine)", 2);
  return o;
}

// prge.zo.schedule.lr_at: the lr of the update made from step `step`'s g, the same double arithmetic
double lr_at(const Options& o, long step) {
  if (o.lr_schedule == "constant" || step < 1 || o.steps < 1) return o.lr;
  double x = double(step - 1) / double(o.steps);
  return o.lr_schedule == "linear" ? o.lr * (1.0 - x) : o.lr * 0.5 * (1.0 + std::cos(std::acos(-1.0) * x));
}

// peak resident memory of this process in MB: VmHWM (ru_maxrss would carry a parent's peak across exec)
double peak_rss_mb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// ---------------------------------------------------------------------------------------------
// the loop

struct Loop {
  Options o;
  Program prog;
  Json manifest;
  int64_t q = 0, b = 0, T = 0, K = 0, N = 0, total = 0, n_labels = 0;
  bool classify = true;
  Split train, dev;
  std::vector<int64_t> plan;  // (plan_steps, b)
  int64_t plan_steps = 0;
  std::string sha;
  // trainer state
  double best_acc = -1, before = NAN, seconds = 0;
  long best_step = 0;
  bool has_before = false;

  std::vector<float> fscalar(double x) { return {float(x)}; }

  void load() {
    // manifest
    std::string mpath = o.program + ".json";
    if (!exists(o.program)) fail("program " + o.program + " not found");
    manifest = parse_json(read_file(mpath, "manifest"), "manifest " + mpath);
    const Json* fmt = manifest.get("format");
    if (!fmt || fmt->text != "prge-engine-program") fail(mpath + " is not a prge program manifest");
    auto mint = [&](const char* k) -> int64_t {
      const Json* v = manifest.get(k);
      if (!v || v->kind != Json::Num) fail(mpath + " lacks " + k);
      return int64_t(v->num);
    };
    q = mint("q"); b = mint("batch_size"); T = mint("max_length"); K = mint("answer_slots");
    N = mint("eval_batch_size"); total = mint("total");
    const Json* noise = manifest.get("noise");
    if (noise && noise->text == "host")
      fail("the program takes its noise from the host (noise 'host'); the native trainer runs 'counter' programs (re-export with --noise counter)");
    if (const Json* s = manifest.get("program_sha256")) sha = s->kind == Json::Str ? s->text : "";
    struct stat st;
    stat(o.program.c_str(), &st);
    if (const Json* pb = manifest.get("program_bytes"))
      if (pb->kind == Json::Num && int64_t(pb->num) != int64_t(st.st_size))
        fail(o.program + " is " + std::to_string(st.st_size) + " bytes but its manifest says " + pb->text + " (truncated or replaced)");
    if (o.normalize && q < 2) fail("--normalize needs q >= 2");

    // data
    StFile d = read_safetensors(o.data, "data file");
    const Json* raw_meta = d.metadata.get("prge");
    if (!raw_meta || raw_meta->kind != Json::Str) fail(o.data + " is not a prge engine data file (no 'prge' metadata)");
    Json meta = parse_json(raw_meta->text, o.data + " metadata");
    if (!meta.get("format") || meta.get("format")->text != "prge-engine-data") fail(o.data + " is not a prge engine data file");
    for (const char* k : {"model", "vocab_size", "vocab_sha256", "pad_id", "batch_size", "max_length", "answer_slots", "q", "loss", "label_ids", "layers"}) {
      const Json* a = manifest.get(k);
      const Json* c = meta.get(k);
      if (a && c && a->dump() != c->dump())
        fail("the program does not match the data: " + std::string(k) + " differs (re-export the program or write the data for it)");
    }
    int64_t vocab = manifest.get("vocab_size") ? int64_t(manifest.get("vocab_size")->num) : INT64_MAX;
    auto load_split = [&](const std::string& s, Split& out, bool required) {
      if (!d.find(s + "_input_ids")) {
        if (required) fail(o.data + ": no " + s + " examples");
        return;
      }
      out.ids = d.ints(s + "_input_ids");
      out.pos = d.ints(s + "_target_pos");
      out.tids = d.ints(s + "_target_ids");
      out.mask = d.floats(s + "_target_mask");
      out.label = d.ints(s + "_label");
      const auto& sh = d.find(s + "_input_ids")->shape;
      const auto& ph = d.find(s + "_target_pos")->shape;
      if (sh.size() != 2 || ph.size() != 2) fail(o.data + ": " + s + " tensors have the wrong rank");
      out.n = sh[0];
      if (sh[1] != T || ph[1] != K)
        fail(o.data + ": " + s + " examples are padded to T=" + std::to_string(sh[1]) + ", K=" + std::to_string(ph[1]) +
             "; the program takes T=" + std::to_string(T) + ", K=" + std::to_string(K));
      if (ph[0] != out.n || int64_t(out.tids.size()) != out.n * K || int64_t(out.mask.size()) != out.n * K || int64_t(out.label.size()) != out.n)
        fail(o.data + ": " + s + " tensors disagree in length");
      for (auto v : out.ids)
        if (v < 0 || v >= vocab) fail(o.data + ": token ids outside the program's vocabulary");
      for (auto v : out.pos)
        if (v < 0 || v >= T) fail(o.data + ": target positions outside the sequence");
    };
    load_split("train", train, true);
    load_split("dev", dev, false);
    if (train.n == 0) fail(o.data + ": no training examples");

    // plan
    StFile p = read_safetensors(o.plan, "plan file");
    const StTensor* pi = p.find("indices");
    if (!pi || pi->shape.size() != 2) fail(o.plan + " is not a prge step plan (no indices (steps, b))");
    if (pi->shape[1] != b) fail(o.plan + ": the plan has " + std::to_string(pi->shape[1]) + " examples per step, the program takes b=" + std::to_string(b));
    plan = p.ints("indices");
    plan_steps = pi->shape[0];
    auto pseed = p.ints("seed");
    if (pseed.size() != 1 || pseed[0] != o.seed) fail(o.plan + " was made for another seed (write the plan for --seed " + std::to_string(o.seed) + ")");
    if (plan_steps < o.steps) fail(o.plan + " covers " + std::to_string(plan_steps) + " steps, fewer than --steps " + std::to_string(o.steps));
    for (auto v : plan)
      if (v < 0 || v >= train.n) fail(o.plan + ": example index outside the training data (a plan for other data)");

    // the program: load it and every method right away (a later load_method re-initialises the shared state)
    prog.path = o.program;
    prog.mod = std::make_unique<Module>(o.program, Module::LoadMode::File, nullptr, nullptr, nullptr, /*share_memory_arenas=*/true);
    if (prog.mod->load() != executorch::runtime::Error::Ok) fail("the runtime cannot load " + o.program + " (corrupt, or not an ExecuTorch program)");
    for (const char* m : {"train_step", "read_state", "read_raw", "write_raw", "evaluate"}) {
      auto names = prog.mod->method_names();
      if (!names.ok() || !names->count(m)) fail(o.program + " lacks the method " + m + " (export it with `prge export`)");
      if (prog.mod->load_method(m) != executorch::runtime::Error::Ok) fail("the runtime cannot load method " + std::string(m) + " of " + o.program);
    }
    // shapes from the program itself
    auto ts = prog.input_shapes("train_step");
    if (ts.size() != 9)
      fail(o.program + ": train_step takes " + std::to_string(ts.size()) + " inputs, expected 9 (a noise 'host' program is not supported)");
    if (ts[0] != std::vector<int64_t>{b, T} || ts[1] != std::vector<int64_t>{b, K} || ts[7] != std::vector<int64_t>{q})
      fail(o.program + ": train_step takes input_ids " + shape_str(ts[0]) + ", target_pos " + shape_str(ts[1]) + ", g " + shape_str(ts[7]) +
           " but the manifest says b=" + std::to_string(b) + ", T=" + std::to_string(T) + ", K=" + std::to_string(K) + ", q=" + std::to_string(q));
    if (prog.output_shape("read_state", 0) != std::vector<int64_t>{total}) fail(o.program + ": read_state does not return (total,)");
    auto es = prog.input_shapes("evaluate");
    classify = es.size() == 4;
    if (!classify && es.size() != 6) fail(o.program + ": evaluate takes " + std::to_string(es.size()) + " inputs, expected 4 or 6");
    if (es[0] != std::vector<int64_t>{N, T}) fail(o.program + ": evaluate takes input_ids " + shape_str(es[0]) + ", expected (N, T)");
    if (classify) {
      auto so = prog.output_shape("evaluate", 0);
      n_labels = so.size() == 2 ? so[1] : 0;
      for (auto v : train.label)
        if (v < 0 || v >= n_labels) fail(o.data + ": class labels outside the program's label words");
      for (auto v : dev.label)
        if (v < 0 || v >= n_labels) fail(o.data + ": class labels outside the program's label words");
    }
  }

  struct Eval { double acc, loss; int64_t n; std::vector<double> share; };

  // g is step g_step's: its pending update is folded in at that step's lr
  Eval evaluate(std::vector<float>& g, long g_step) {
    double correct = 0, loss = 0, tokens = 0;
    std::vector<double> counts(size_t(std::max<int64_t>(n_labels, 1)), 0.0);
    auto lr = fscalar(lr_at(o, g_step));
    for (int64_t start = 0; start < dev.n; start += N) {
      int64_t k = std::min(N, dev.n - start);
      std::vector<int64_t> idx;
      for (int64_t i = 0; i < N; ++i) idx.push_back(i < k ? start + i : start);
      Rows r = gather(dev, idx, T, K);
      int32_t n32 = int32_t(N), t32 = int32_t(T), k32 = int32_t(K), q32 = int32_t(q);
      if (classify) {
        std::vector<int64_t> pos1(static_cast<size_t>(N));
        for (int64_t i = 0; i < N; ++i) pos1[size_t(i)] = r.pos[size_t(i * K)];
        auto out = prog.run("evaluate", {i64t(r.ids, {n32, t32}), i64t(pos1, {n32, 1}), f32t(g, {q32}), f32t(lr, {1})});
        const auto& sc = out.at(0);
        int64_t L = n_labels;
        for (int64_t i = 0; i < k; ++i) {
          const float* row = sc.data() + i * L;
          int64_t arg = 0;
          float mx = row[0];
          for (int64_t j = 1; j < L; ++j)
            if (row[j] > mx) { mx = row[j]; arg = j; }
          float s = 0;
          for (int64_t j = 0; j < L; ++j) s += std::exp(row[j] - mx);
          float lse = mx + std::log(s);
          correct += arg == r.label[size_t(i)];
          counts[size_t(arg)] += 1;
          loss += double(lse - row[r.label[size_t(i)]]);
          tokens += 1;
        }
      } else {
        auto out = prog.run("evaluate", {i64t(r.ids, {n32, t32}), i64t(r.pos, {n32, k32}), i64t(r.tids, {n32, k32}),
                                         f32t(r.mask, {n32, k32}), f32t(g, {q32}), f32t(lr, {1})});
        for (int64_t i = 0; i < k; ++i) {
          loss += out.at(0)[size_t(i)];
          correct += out.at(1)[size_t(i)];
          for (int64_t j = 0; j < K; ++j) tokens += r.mask[size_t(i * K + j)];
        }
      }
    }
    Eval e{correct / std::max(tokens, 1.0), loss / std::max(tokens, 1.0), dev.n, {}};
    if (classify)
      for (auto c : counts) e.share.push_back(c / double(std::max<int64_t>(dev.n, 1)));
    return e;
  }

  std::string state_json(long step) {
    std::string s = "{\n  \"step\": " + std::to_string(step) + ",\n  \"seed\": " + std::to_string(o.seed) +
                    ",\n  \"lr\": " + jnum(o.lr) + ",\n  \"lr_schedule\": " + jstr(o.lr_schedule) + ",\n  \"eps\": " + jnum(o.eps) + ",\n  \"normalize\": " + (o.normalize ? "true" : "false") +
                    ",\n  \"program_sha256\": " + (sha.empty() ? "null" : jstr(sha)) + ",\n  \"best_accuracy\": " + jnum(best_acc) +
                    ",\n  \"best_step\": " + std::to_string(best_step) + ",\n  \"before\": " + (has_before ? jnum(before) : "null") +
                    ",\n  \"seconds\": " + jnum(seconds) + ",\n  \"native\": true\n}\n";
    return s;
  }

  void save_checkpoint(const std::string& folder, long step, std::vector<float>& g) {
    auto raw = prog.run("read_raw", {}).at(0);
    auto lr = fscalar(lr_at(o, step));  // g is this step's
    auto bflat = prog.run("read_state", {f32t(g, {int32_t(q)}), f32t(lr, {1})}).at(0);
    std::string tmp = temp_dir_beside(folder);
    try {
      atomic_write(tmp + "/state.safetensors", safetensors_bytes({f32("raw", raw), f32("g", g)}));
      atomic_write(tmp + "/trainer_state.json", state_json(step));
      atomic_write(tmp + "/b.safetensors", safetensors_bytes({f32("b", bflat)}));
    } catch (...) {
      rmtree(tmp);
      throw;
    }
    commit_dir(tmp, folder);
  }

  void append_metrics(const std::string& row) {
    std::string path = o.out + "/metrics.jsonl";
    FILE* f = fopen(path.c_str(), "a");
    if (!f) fail("cannot append to " + path + " (" + strerror(errno) + ")");
    fputs((row + "\n").c_str(), f);
    if (fclose(f) != 0) fail("cannot write " + path);
  }

  std::string eval_row(long step, const Eval& e) {
    std::string s = "{\"step\": " + std::to_string(step) + ", \"split\": \"dev\", \"accuracy\": " + jnum(e.acc) +
                    ", \"loss\": " + jnum(e.loss) + ", \"n\": " + std::to_string(e.n);
    if (classify) {
      s += ", \"label_share\": [";
      for (size_t i = 0; i < e.share.size(); ++i) s += (i ? ", " : "") + jnum(e.share[i]);
      s += "]";
    }
    return s + "}";
  }

  int run() {
    load();
    std::string ckpts = o.out + "/checkpoints", metrics = o.out + "/metrics.jsonl";
    // refuse an unwritable output folder before any work
    mkdirs(o.out);
    atomic_write(o.out + "/.prge-native-write-test", "");
    unlink((o.out + "/.prge-native-write-test").c_str());

    std::vector<float> g(size_t(q), 0.0f);
    long start = 0;
    bool has_dev = dev.n > 0;
    if (o.resume) {
      std::string last = ckpts + "/last";
      if (!exists(last) && is_dir(last + ".old")) last += ".old";
      Json st = parse_json(read_file(last + "/trainer_state.json", "checkpoint state"), last + "/trainer_state.json");
      const Json* step = st.get("step");
      if (!step || step->kind != Json::Num) fail(last + "/trainer_state.json is damaged");
      const Json* sd = st.get("seed");
      if (sd && sd->kind == Json::Num && (long long)sd->num != o.seed)
        fail("the checkpoint was trained with seed " + sd->text + ", not " + std::to_string(o.seed) + " (resume with --seed " + sd->text + ")");
      const Json* ps = st.get("program_sha256");
      if (ps && ps->kind == Json::Str && !sha.empty() && ps->text != sha) fail("the checkpoint in " + last + " was written by another program");
      StFile sf = read_safetensors(last + "/state.safetensors", "checkpoint");
      auto raw = sf.floats("raw");
      g = sf.floats("g");
      auto raw_shape = prog.output_shape("read_raw", 0);
      if (raw_shape.size() != 1 || int64_t(raw.size()) != raw_shape[0] || int64_t(g.size()) != q)
        fail(last + "/state.safetensors does not hold this program's state (resume with the program that wrote it)");
      for (float v : raw)
        if (!std::isfinite(v)) fail("the checkpoint in " + last + " holds non-finite values");
      start = long(step->num);
      if (auto v = st.get("best_accuracy")) if (v->kind == Json::Num) best_acc = v->num;
      if (auto v = st.get("best_step")) if (v->kind == Json::Num) best_step = long(v->num);
      if (auto v = st.get("before")) if (v->kind == Json::Num) { before = v->num; has_before = true; }
      if (auto v = st.get("seconds")) if (v->kind == Json::Num) seconds = v->num;
      prog.run("write_raw", {f32t(raw, {int32_t(raw.size())})});
      // drop metric rows after the checkpoint
      if (exists(metrics)) {
        std::ifstream in(metrics);
        std::string line, kept;
        while (std::getline(in, line)) {
          if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
          Json r = parse_json(line, metrics);
          const Json* s = r.get("step");
          if (s && s->num <= start) kept += line + "\n";
        }
        atomic_write(metrics, kept);
      }
      fprintf(stderr, "resumed from %s at step %ld\n", last.c_str(), start);
    } else {
      unlink(metrics.c_str());
      if (has_dev) {
        Eval e = evaluate(g, 0);
        before = best_acc = e.acc;
        has_before = true;
        append_metrics(eval_row(0, e));
        fprintf(stderr, "before training: dev accuracy %.4f (n=%lld)\n", e.acc, (long long)e.n);
      }
      save_checkpoint(ckpts + "/best", 0, g);
      save_checkpoint(ckpts + "/last", 0, g);  // a kill before the first step keeps the evaluation
    }

    double t_loop = now() - seconds, step_time = 0;
    // never below the resumed step: a checkpoint must not be relabelled with an earlier step
    long end = o.stop_after ? std::max(start, std::min(o.steps, o.stop_after)) : o.steps, timed = 0;
    double last_acc = NAN;
    auto eps = fscalar(o.eps);
    int32_t b32 = int32_t(b), t32 = int32_t(T), k32 = int32_t(K), q32 = int32_t(q);
    for (long step = start + 1; step <= end; ++step) {
      double t = now();
      std::vector<int64_t> idx(plan.begin() + (step - 1) * b, plan.begin() + step * b);
      Rows r = gather(train, idx, T, K);
      std::vector<int64_t> key = {o.seed, step};
      auto lr = fscalar(lr_at(o, step - 1));  // the pending update is step - 1's
      auto losses = prog.run("train_step", {i64t(r.ids, {b32, t32}), i64t(r.pos, {b32, k32}), i64t(r.tids, {b32, k32}), f32t(r.mask, {b32, k32}),
                                            i64t(r.label, {b32}), f32t(lr, {1}), f32t(eps, {1}), f32t(g, {q32}), i64t(key, {2})}).at(0);
      if (int64_t(losses.size()) != 2 * q) fail("train_step returned " + std::to_string(losses.size()) + " losses, expected 2q");
      for (float v : losses)
        if (!std::isfinite(v)) fail("non-finite loss at step " + std::to_string(step) + "; the last good checkpoint is kept in " + ckpts + "/last (lower --lr or --eps and resume)");
      // g_i = (L+_i - L-_i) / 2eps, or / (2 std(L)) with --normalize (estimator.projected_grad)
      float den = float(2.0 * o.eps);
      if (o.normalize) {
        double mean = 0, var = 0;
        for (float v : losses) mean += v;
        mean /= double(losses.size());
        for (float v : losses) var += (v - mean) * (v - mean);
        float sd = float(std::sqrt(var / double(losses.size() - 1)));
        den = 2.0f * std::max(sd, 1e-12f);
      }
      double gabs = 0, loss = 0;
      for (int64_t i = 0; i < q; ++i) {
        g[size_t(i)] = (losses[size_t(i)] - losses[size_t(q + i)]) / den;
        gabs += std::fabs(g[size_t(i)]);
      }
      float lsum = 0;
      for (float v : losses) lsum += v;
      loss = double(lsum / float(losses.size()));
      double dt = now() - t;
      step_time += dt;
      ++timed;
      append_metrics("{\"step\": " + std::to_string(step) + ", \"loss\": " + jnum(loss) + ", \"g_abs\": " + jnum(gabs / double(q)) +
                     ", \"seconds\": " + jnum(dt) + "}");
      if ((o.eval_every && step % o.eval_every == 0) || step == o.steps) {
        seconds = now() - t_loop;
        if (has_dev) {
          Eval e = evaluate(g, step);
          last_acc = e.acc;
          append_metrics(eval_row(step, e));
          if (e.acc > best_acc) {
            best_acc = e.acc;
            best_step = step;
            save_checkpoint(ckpts + "/best", step, g);
          }
        }
        save_checkpoint(ckpts + "/last", step, g);
      } else if (o.checkpoint_every && step % o.checkpoint_every == 0 && step < end) {
        seconds = now() - t_loop;
        save_checkpoint(ckpts + "/last", step, g);
      }
    }
    seconds = now() - t_loop;
    double rss = peak_rss_mb();
    std::string info = "{\n  \"steps\": " + std::to_string(o.steps) + ",\n  \"ran_from\": " + std::to_string(start) +
                       ",\n  \"ran_to\": " + std::to_string(end) + ",\n  \"seconds\": " + jnum(seconds) +
                       ",\n  \"step_seconds\": " + (timed ? jnum(step_time / double(timed)) : "null") +
                       ",\n  \"peak_rss_mb\": " + jnum(rss) +
                       ",\n  \"dev_before\": " + (has_before ? jnum(before) : "null") +
                       ",\n  \"dev_after\": " + (std::isnan(last_acc) ? "null" : jnum(last_acc)) +
                       ",\n  \"best_dev\": " + jnum(best_acc) + ",\n  \"best_step\": " + std::to_string(best_step) +
                       ",\n  \"stopped\": " + ((o.stop_after && end < o.steps) ? "true" : "false") + "\n}\n";
    if (o.stop_after && end < o.steps) {
      std::vector<float> gg = g;
      save_checkpoint(ckpts + "/last", end, gg);
      atomic_write(o.out + "/native.json", info);
      fprintf(stderr, "stopped after step %ld; resume with --resume\n", end);
      return 0;
    }
    auto lr = fscalar(lr_at(o, end));  // g is step end's
    auto bflat = prog.run("read_state", {f32t(g, {q32}), f32t(lr, {1})}).at(0);
    atomic_write(o.out + "/final_b.safetensors", safetensors_bytes({f32("b", bflat), f32("g", g)}));
    atomic_write(o.out + "/native.json", info);
    fprintf(stderr, "native training done: %ld steps in %.1f s (%.4f s/step, peak RSS %.0f MB)\n", o.steps, seconds,
            timed ? step_time / double(timed) : 0.0, rss);
    return 0;
  }
};

}  // namespace

int main(int argc, char** argv) {
  try {
    Loop loop;
    loop.o = parse_args(argc, argv);
    return loop.run();
  } catch (const Fail& e) {
    fprintf(stderr, "prge-native-train: error: %s\n", e.what());
    if (e.code == 2) fputs(USAGE, stderr);
    return e.code;
  } catch (const std::exception& e) {
    fprintf(stderr, "prge-native-train: error: %s\n", e.what());
    return 1;
  }
}

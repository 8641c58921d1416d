#include "program.h"

#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

#include "files.h"
#include "sha256.h"
#include "weight_cache.h"

namespace prge {

using executorch::aten::ScalarType;
using executorch::extension::MmapDataLoader;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;
using executorch::runtime::DataLoader;
using executorch::runtime::Error;
using executorch::runtime::FreeableBuffer;
using executorch::runtime::Result;
using nlohmann::json;

namespace {

// The program memory-mapped (as Module::LoadMode::Mmap), with the constant segment advised as random
// access. That segment holds the weights the runtime reads itself rather than XNNPACK packing them,
// above all the embedding table (113 MB for SmolLM2, 671 MB for Gemma-3-270M), of which a step reads
// a few hundred rows. Without the advice each row's fault brings in the kernel's readahead window
// around it, and a few thousand distinct tokens make the whole table resident (105 of SmolLM2's 113
// MB after 3 steps and an evaluation); with it, only the pages of the rows read.
class RandomAccessConstants final : public DataLoader {
 public:
  explicit RandomAccessConstants(MmapDataLoader inner) : inner_(std::move(inner)) {}
  Result<FreeableBuffer> load(size_t offset, size_t size, const SegmentInfo& info) const override {
    auto buf = inner_.load(offset, size, info);
    if (buf.ok() && info.segment_type == SegmentInfo::Type::Constant && buf->size() > 0) {
      uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE)), p = reinterpret_cast<uintptr_t>(buf->data());
      uintptr_t start = p & ~(page - 1);  // the mapping begins on this page
      madvise(reinterpret_cast<void*>(start), p + buf->size() - start, MADV_RANDOM);  // a hint: failure changes nothing
    }
    return buf;
  }
  Error load_into(size_t offset, size_t size, const SegmentInfo& info, void* buffer) const override {
    return inner_.load_into(offset, size, info, buffer);
  }
  Result<size_t> size() const override { return inner_.size(); }

 private:
  MmapDataLoader inner_;
};

}  // namespace

const char* const TRAINING_METHODS[5] = {"train_step", "read_state", "read_raw", "write_raw", "evaluate"};

double quantized_min_eps(const std::string& quantization) {  // prge.engine.formats.MIN_EPS_BY_QUANTIZATION
  if (quantization.empty() || quantization == "none") return 0.0;
  if (quantization == "8da8w") return 1e-2;
  return 3e-2;  // 8da4w, and any other (QUANTIZED_MIN_EPS)
}

Program::Program(const std::string& path, bool weight_cache) : path_(path) {
  if (!exists(path)) fail("program " + path + " not found");
  if (is_dir(path)) fail("program " + path + " is a folder, not a file");
  // with the cache on, the methods share one packed copy of the weights (weight_cache.h)
  if (prge_set_weight_cache(weight_cache) != 0)
    fail("the runtime has no XNNPACK backend to share packed weights with (build against the executorch wheel)");
  // the manifest's size check first: a truncated program is named as such, not as corrupt
  std::string mpath = path + ".json";
  if (exists(mpath)) {
    desc_.manifest = json::parse(read_file(mpath, "manifest"), nullptr, false);
    if (desc_.manifest.is_discarded() || !desc_.manifest.is_object() || desc_.manifest.value("format", "") != "prge-engine-program")
      fail(mpath + " is not a prge program manifest (export the program with `prge export`)");
    struct stat st;
    stat(path.c_str(), &st);
    auto bytes = desc_.manifest.find("program_bytes");
    if (bytes != desc_.manifest.end() && bytes->is_number_integer() && bytes->get<int64_t>() != int64_t(st.st_size))
      fail(path + " is " + std::to_string(st.st_size) + " bytes but its manifest says " + bytes->dump() + " (truncated or replaced)");
    desc_.sha256 = desc_.manifest.value("program_sha256", "");
    if (!desc_.sha256.empty() && hashing_available() && sha256_file(path) != desc_.sha256)
      fail(path + " is damaged: its SHA-256 differs from the program_sha256 its manifest recorded at export "
           "(copy or export it again)");
  }
  // memory-mapped: the constant segment stays in the page cache, not in a private copy
  auto loader = MmapDataLoader::from(path.c_str(), MmapDataLoader::MlockConfig::NoMlock);
  if (loader.ok())
    module_ = std::make_unique<Module>(std::make_unique<RandomAccessConstants>(std::move(*loader)), nullptr, nullptr, nullptr, nullptr,
                                       /*share_memory_arenas=*/true);
  if (!module_ || module_->load() != Error::Ok) fail("the runtime cannot load " + path + " (corrupt, or not an ExecuTorch program)");
  auto names = module_->method_names();
  if (!names.ok()) fail("the runtime cannot read the methods of " + path);
  for (const char* m : TRAINING_METHODS)
    if (!names->count(m)) fail(path + " lacks the method " + m + " (export it with `prge export`)");
  desc_.self_described = names->count("get_identity_sha256") > 0;
  describe();
  // every training method before the first call: loading one later re-initialises the shared state
  for (const char* m : TRAINING_METHODS)
    if (module_->load_method(m) != Error::Ok) fail("the runtime cannot load method " + std::string(m) + " of " + path);
}

bool Program::has(const std::string& method) const { return module_->method_meta(method).ok(); }

void Program::load(const std::string& method) {
  if (module_->load_method(method) != Error::Ok) fail("the runtime cannot load method " + method + " of " + path_);
}

EValue Program::constant(const std::string& method) {
  auto out = module_->execute(method);
  if (!out.ok() || out->size() != 1) fail(path_ + ": its constant method " + method + " cannot be run (re-export the program)");
  return (*out)[0];
}

void Program::describe() {
  Description& d = desc_;
  if (d.self_described) {
    auto integer = [&](const char* m) {
      EValue v = constant(m);
      if (!v.isInt()) fail(path_ + ": " + m + " does not return an integer (re-export the program)");
      return v.toInt();
    };
    auto text = [&](const char* m) {
      EValue v = constant(m);
      if (!v.isString()) fail(path_ + ": " + m + " does not return a string (re-export the program)");
      return std::string(v.toString());
    };
    d.identity = text("get_identity_sha256");
    d.noise = text("get_noise");
    d.q = integer("get_q");
    d.b = integer("get_batch_size");
    d.T = integer("get_max_seq_len");
    d.K = integer("get_answer_slots");
    d.N = integer("get_eval_batch_size");
    d.total = integer("get_total");
    d.vocab = integer("get_vocab_size");
  } else {
    // a program exported before programs described themselves: its manifest says it
    const json& m = d.manifest;
    if (m.is_null()) fail(path_ + ".json not found (a program without constant methods needs its manifest; re-export it)");
    auto integer = [&](const char* k) {
      if (!m.contains(k) || !m[k].is_number_integer()) fail(path_ + ".json lacks " + std::string(k));
      return m[k].get<int64_t>();
    };
    d.q = integer("q");
    d.b = integer("batch_size");
    d.T = integer("max_length");
    d.K = integer("answer_slots");
    d.N = integer("eval_batch_size");
    d.total = integer("total");
    if (m.contains("vocab_size") && m["vocab_size"].is_number_integer()) d.vocab = m["vocab_size"].get<int64_t>();
    d.noise = m.value("noise", "counter");
    d.identity = m.value("identity_sha256", "");
  }
  // the smallest eps the base resolves (prge.engine.formats.min_eps): what the program says (get_min_eps) or
  // its manifest records, and at least its quantisation's floor where the manifest names a quantised base
  if (module_->method_meta("get_min_eps").ok()) {
    EValue v = constant("get_min_eps");
    if (!v.isDouble()) fail(path_ + ": get_min_eps does not return a number (re-export the program)");
    d.min_eps = v.toDouble();
  }
  if (d.manifest.is_object()) {
    auto me = d.manifest.find("min_eps");
    auto qz = d.manifest.find("quantization");
    if (me != d.manifest.end() && me->is_number()) d.min_eps = std::max(d.min_eps, me->get<double>());
    if (qz != d.manifest.end() && qz->is_string()) d.min_eps = std::max(d.min_eps, quantized_min_eps(qz->get<std::string>()));
  }
  if (d.noise != "counter")
    fail("the program draws its noise with '" + d.noise + "'; the native trainer runs 'counter' programs (re-export with --noise counter)");
  // the methods' own shapes must agree with the description
  auto ts = input_shapes("train_step");
  if (ts.size() == 10 && module_->method_meta("update").ok())
    fail(path_ + " is exported for several ranks (prge export --ranks N); the native trainer runs one process: run it with "
         "torchrun -m prge device-train, or export it with --ranks 1");
  if (ts.size() != 9) fail(path_ + ": train_step takes " + std::to_string(ts.size()) + " inputs, expected 9");
  if (ts[0] != std::vector<int64_t>{d.b, d.T} || ts[1] != std::vector<int64_t>{d.b, d.K} || ts[7] != std::vector<int64_t>{d.q})
    fail(path_ + ": train_step takes input_ids " + shape_str(ts[0]) + ", target_pos " + shape_str(ts[1]) + ", g " + shape_str(ts[7]) +
         " but the program says b=" + std::to_string(d.b) + ", T=" + std::to_string(d.T) + ", K=" + std::to_string(d.K) +
         ", q=" + std::to_string(d.q));
  if (output_shape("read_state", 0) != std::vector<int64_t>{d.total}) fail(path_ + ": read_state does not return (total,)");
  if (input_shapes("evaluate").at(0) != std::vector<int64_t>{d.N, d.T})
    fail(path_ + ": evaluate takes input_ids " + shape_str(input_shapes("evaluate")[0]) + ", expected (N, T)");
}

std::vector<std::vector<int64_t>> Program::input_shapes(const std::string& m) {
  auto meta = module_->method_meta(m);
  if (!meta.ok()) fail(path_ + " has no method " + m);
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

std::vector<int64_t> Program::output_shape(const std::string& m, size_t i) {
  auto meta = module_->method_meta(m);
  if (!meta.ok() || i >= meta->num_outputs()) fail(path_ + ": method " + m + " has no output " + std::to_string(i));
  auto t = meta->output_tensor_meta(i);
  std::vector<int64_t> s;
  if (t.ok())
    for (auto d : t->sizes()) s.push_back(d);
  return s;
}

std::vector<Program::View> Program::run_view(const std::string& m, const std::vector<TensorPtr>& inputs) {
  std::vector<EValue> args;
  args.reserve(inputs.size());
  for (auto& t : inputs) args.emplace_back(*t);
  auto res = module_->execute(m, args);
  if (!res.ok()) fail("the runtime failed to run " + m + " of " + path_ + " (error " + std::to_string(int(res.error())) + ")");
  std::vector<View> out;
  for (auto& v : *res) {
    if (!v.isTensor()) fail(m + " returned a non-tensor output");
    auto t = v.toTensor();
    if (t.scalar_type() != ScalarType::Float) fail(m + " returned a non-float32 output");
    out.push_back({t.const_data_ptr<float>(), size_t(t.numel())});
  }
  return out;
}

std::vector<std::vector<float>> Program::run(const std::string& m, const std::vector<TensorPtr>& inputs) {
  std::vector<std::vector<float>> out;
  for (const View& v : run_view(m, inputs)) out.emplace_back(v.data, v.data + v.n);
  return out;
}

TensorPtr f32_tensor(std::vector<float>& v, std::vector<int32_t> shape) {
  return executorch::extension::from_blob(v.data(), std::vector<executorch::aten::SizesType>(shape.begin(), shape.end()),
                                          ScalarType::Float);
}

TensorPtr i64_tensor(std::vector<int64_t>& v, std::vector<int32_t> shape) {
  return executorch::extension::from_blob(v.data(), std::vector<executorch::aten::SizesType>(shape.begin(), shape.end()),
                                          ScalarType::Long);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? "," : "") + std::to_string(s[i]);
  return o + (s.size() == 1 ? ",)" : ")");
}

}  // namespace prge

// The exported program: loaded once (memory-mapped, every method at once, the methods sharing their
// memory arenas and XNNPACK's packed weights), and what it says about itself.
#pragma once

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace prge {

// The methods training calls (prge.engine.formats.METHODS).
extern const char* const TRAINING_METHODS[5];

// prge.engine.formats.quantized_min_eps: the eps floor of a base quantised with `quantization` (0 for fp32)
double quantized_min_eps(const std::string& quantization);

// What a program is: its shapes and the identity hash its data must carry. A program exported with
// constant methods (`get_identity_sha256`, `get_q`, ...) says it itself; an older one is described by
// its manifest X.pte.json.
struct Description {
  int64_t q = 0, b = 0, T = 0, K = 0, N = 0, total = 0, vocab = INT64_MAX;
  std::string noise;         // "counter" | "host" | "engine"
  std::string identity;      // sha256 of the identity fields (prge.engine.formats.identity_sha256); "" if none
  double min_eps = 0;        // smallest eps the base resolves (get_min_eps, else the manifest; prge.engine.formats.min_eps)
  std::string sha256;        // of the .pte file (from the manifest; checkpoints name it); "" if unknown
  nlohmann::json manifest;   // the manifest if there is one, else null
  bool self_described = false;
};

class Program {
 public:
  Program(const std::string& path, bool weight_cache);

  const Description& description() const { return desc_; }
  bool has(const std::string& method) const;
  // load a method the loop does not call (the label readout's): it re-initialises the program's shared
  // state, as loading any method after the first call does, so the caller writes the state after it
  void load(const std::string& method);
  std::vector<std::vector<int64_t>> input_shapes(const std::string& method);
  std::vector<int64_t> output_shape(const std::string& method, size_t i);
  // run a method; every output copied out as float32 (outputs alias the shared arenas)
  std::vector<std::vector<float>> run(const std::string& method, const std::vector<executorch::extension::TensorPtr>& inputs);
  // the same without the copy: each float32 output where it lies in the arena, valid until the next run
  struct View {
    const float* data;
    size_t n;
  };
  std::vector<View> run_view(const std::string& method, const std::vector<executorch::extension::TensorPtr>& inputs);

 private:
  void describe();
  executorch::runtime::EValue constant(const std::string& method);

  std::string path_;
  std::unique_ptr<executorch::extension::Module> module_;
  Description desc_;
};

// tensors over host vectors, in the program's input types
executorch::extension::TensorPtr f32_tensor(std::vector<float>& v, std::vector<int32_t> shape);
executorch::extension::TensorPtr i64_tensor(std::vector<int64_t>& v, std::vector<int32_t> shape);
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace prge

#include "weight_cache.h"

#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>

extern "C" int prge_set_weight_cache(int on) {
  executorch::runtime::BackendOptions<1> opts;
  opts.set_option("weight_cache_enabled", on != 0);
  return int(executorch::runtime::set_option("XnnpackBackend", opts.view()));
}

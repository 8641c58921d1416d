// XNNPACK's weight cache: each XNNPACK-delegated method packs its own copy of the linear weights at
// load; with the cache on, the methods of a program share one packed copy. It is a global option of
// the backend registered as "XnnpackBackend", off by default, read when a method is loaded.
//
// Built into the native trainer and, as libprge_weight_cache.so, loaded by the Python device loop
// (prge.engine.native.set_weight_cache, through ctypes): executorch.runtime has no API for backend
// options, and this library reaches the runtime the Python bindings use (the wheel's shared
// libexecutorch.so) through its public C++ API.
#pragma once

extern "C" {
// 0 on success, else the runtime's error code (e.g. the XNNPACK backend is not registered)
int prge_set_weight_cache(int on);
}

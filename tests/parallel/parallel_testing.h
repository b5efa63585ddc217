// Helpers for the multi-rank tests: the process's MpiContext (made in
// main.cpp), the CPU stream, and the message of an expected error. Every rank
// runs every test; a test must take the same collective path on all ranks
// (decide on the group size, never on a result only one rank sees).
#pragma once

#include <functional>
#include <string>

#include "framework/error.h"
#include "framework/stream.h"
#include "parallel/mpi_context.h"

namespace loom::testing {

MpiContext& mpi_context();
inline Stream& cpu_stream() { return Stream::default_for(Device::cpu()); }

// The message of the loom::Error `fn` throws ("" when it throws none).
inline std::string error_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace loom::testing

// LOOM_MPI_CHECK for translation units that include MPI.
#pragma once
// C API only: the deprecated C++ bindings would need libmpi_cxx at link time.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <string>

#include "framework/error.h"

namespace loom::detail {
inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "unknown MPI error";
  return std::string(text, static_cast<size_t>(length));
}
}  // namespace loom::detail

#define LOOM_MPI_CHECK(call) LOOM_CHECK_STATUS(call, MPI_SUCCESS, ::loom::detail::mpi_error_string)

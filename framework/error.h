// loom::Error and the checking macros used everywhere.
// LOOM_CHECK(cond) << "what, with values" throws loom::Error carrying the file,
// the line, the failed condition and the streamed message. Library code never
// exits; only main() turns an Error into an exit code.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace loom {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {

// Collects the streamed message; its destructor is never reached on failure
// because `raise()` throws from the enclosing full expression.
class CheckMessage {
 public:
  CheckMessage(const char* file, int line, const char* condition) {
    stream_ << file << ":" << line << ": ";
    if (condition != nullptr && condition[0] != '\0') stream_ << "check failed: " << condition << ": ";
  }
  template <typename T>
  CheckMessage& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }
  std::string str() const { return stream_.str(); }

 private:
  std::ostringstream stream_;
};

// `Raiser() & message` lets the macro throw after all `<<` have been applied.
struct Raiser {
  [[noreturn]] void operator&(const CheckMessage& message) const { throw Error(message.str()); }
};

}  // namespace detail
}  // namespace loom

#define LOOM_CHECK(cond) \
  if (cond) {            \
  } else                 \
    ::loom::detail::Raiser() & ::loom::detail::CheckMessage(__FILE__, __LINE__, #cond)

// Unconditional failure with a message: LOOM_FAIL() << "unsupported dtype " << d;
#define LOOM_FAIL() ::loom::detail::Raiser() & ::loom::detail::CheckMessage(__FILE__, __LINE__, "")

// Status-code APIs (CUDA, MPI, NCCL): `call` is evaluated once; when it does not
// return `ok`, the error string from `describe(code)` goes into the message.
#define LOOM_CHECK_STATUS(call, ok, describe)                                               \
  for (auto loom_status_ = (call); loom_status_ != (ok); loom_status_ = (ok))              \
  ::loom::detail::Raiser() & ::loom::detail::CheckMessage(__FILE__, __LINE__, #call)        \
                                 << describe(loom_status_) << " (code " << static_cast<long>(loom_status_) << ") "

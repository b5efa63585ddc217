// Helpers for the data tests (the scratch directory is tests/testing.h's TempDir):
// raw file writing for corrupt inputs, and an expectation that a call throws loom::Error
// whose message contains given fragments (file names, expected vs found values).
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

#include "framework/error.h"
#include "tests/testing.h"  // TempDir

namespace loom::testing {

inline void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

inline std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Overwrites sizeof(T) bytes at `offset` of a byte buffer with `value` (little-endian host).
template <typename T>
void poke(std::vector<uint8_t>& bytes, size_t offset, T value) {
  if (bytes.size() < offset + sizeof(T)) bytes.resize(offset + sizeof(T));
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

// Passes when fn() throws loom::Error whose message contains every fragment.
template <typename Fn>
::testing::AssertionResult throws_with(Fn&& fn, std::initializer_list<std::string> fragments) {
  try {
    fn();
  } catch (const loom::Error& e) {
    const std::string what = e.what();
    for (const std::string& f : fragments) {
      if (what.find(f) == std::string::npos)
        return ::testing::AssertionFailure() << "message lacks '" << f << "': " << what;
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-loom exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}
#define EXPECT_THROWS_WITH(stmt, ...) EXPECT_TRUE(::loom::testing::throws_with([&] { stmt; }, {__VA_ARGS__}))

}  // namespace loom::testing

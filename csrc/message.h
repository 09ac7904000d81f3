// FR_CHECK: TORCH_CHECK with its message built here, without std::ostream.
//
// Why: on the 2026-11-27 H100 machine (benchmarks/results/2026-11-27_H100_run3) every input check of _C whose
// message streamed an integer crashed the process (SIGSEGV inside std::ostream::_M_insert<long>, which cuda-gdb
// placed in _C's own code), while checks whose messages held only strings raised as they should. Numbers here go
// through std::to_chars and snprintf, which touch neither iostreams nor locales, and TORCH_CHECK receives one
// std::string, which c10 passes on without a stream. Like TORCH_CHECK, the message is only built when the check
// fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fused_resnet {
namespace message_detail {

inline void append(std::string& s, std::string_view v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, char v) { s += v; }

template <typename T>
  requires(std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>)
void append(std::string& s, T v) {
  char buffer[24];
  const auto end = std::to_chars(buffer, buffer + sizeof(buffer), v).ptr;
  s.append(buffer, end);
}

inline void append(std::string& s, double v) {
  char buffer[32];
  const int n = std::snprintf(buffer, sizeof(buffer), "%g", v);
  s.append(buffer, n > 0 ? static_cast<size_t>(n) : 0);
}
inline void append(std::string& s, float v) { append(s, static_cast<double>(v)); }

inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, c10::DeviceType v) { s += c10::DeviceTypeName(v, /*lower_case=*/true); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }

// c10's names for the layouts (its operator<< for Layout prints these).
inline void append(std::string& s, c10::Layout v) {
  switch (v) {
    case c10::kStrided: s += "Strided"; return;
    case c10::kSparse: s += "Sparse"; return;
    case c10::kSparseCsr: s += "SparseCsr"; return;
    case c10::kSparseCsc: s += "SparseCsc"; return;
    case c10::kSparseBsr: s += "SparseBsr"; return;
    case c10::kSparseBsc: s += "SparseBsc"; return;
    case c10::kMkldnn: s += "Mkldnn"; return;
    default: s += "layout #"; append(s, static_cast<int>(v)); return;
  }
}

// As c10 prints sizes: [2, 64, 56, 56].
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    append(s, v[i]);
  }
  s += ']';
}

}  // namespace message_detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (message_detail::append(s, args), ...);
  return s;
}

}  // namespace fused_resnet

#define FR_CHECK(cond, ...) TORCH_CHECK(cond, ::fused_resnet::message(__VA_ARGS__))

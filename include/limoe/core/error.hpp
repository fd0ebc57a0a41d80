// limoe/core/error.hpp: the one exception type, and the check macro that throws it.
//
// Every error says what is wrong and, where there is one, how to fix it. The library never aborts,
// never calls exit(), and never prints instead of throwing.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace limoe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

// Throws limoe::Error with the streamed arguments as its message.
template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace limoe

// LIMOE_CHECK(cond, "message", values...): throws limoe::Error("message values...") when cond is false.
#define LIMOE_CHECK(cond, ...)                 \
  do {                                         \
    if (!(cond)) ::limoe::fail(__VA_ARGS__);   \
  } while (0)

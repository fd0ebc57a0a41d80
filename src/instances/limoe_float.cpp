// The model compiled once for the project's own programs (tools, tests, benchmarks), which see it as
// `extern template` through LIMOE_EXTERN_TEMPLATES (limoe_instances in CMakeLists.txt). Users of the
// header-only library are unaffected.
#include "limoe/model/model.hpp"

template class limoe::Limoe<float>;

// Limoe<double> (finite-difference and golden tests) compiled once; see limoe_float.cpp.
#include "limoe/model/model.hpp"

template class limoe::Limoe<double>;

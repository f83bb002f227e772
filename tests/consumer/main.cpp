// Downstream smoke test for the installed package (see run_consumer_test.cmake).
#include <attnforge/attnforge.hpp>

// Usage requirements that must travel with attnforge::attnforge.
static_assert(__cplusplus >= 201703L, "attnforge::attnforge must request C++17");
#ifndef EIGEN_USE_THREADS
#error "attnforge::attnforge must define EIGEN_USE_THREADS"
#endif

int main() { return 0; }

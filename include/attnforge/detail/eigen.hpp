// Eigen, included here once for the whole library.
//
// GCC 12 reports `__Y may be used uninitialized` (-Wmaybe-uninitialized, and
// -Wuninitialized) hundreds of times once Eigen's AVX-512 packets and matrix products are
// inlined at -march=native: its AVX-512 intrinsics pass a deliberately undefined operand
// (`__m512 __Y = __Y;` in _mm512_undefined_ps) as the merge source of unmasked
// operations. This is GCC bug 105593, a false positive (the value is never read), fixed
// in later GCC releases. GCC decides by the location of the code it warns about, so
// silencing the two warnings for the text of Eigen's headers (and the intrinsics they
// include) silences exactly these reports, wherever attnforge instantiates them, while
// the warnings stay on for attnforge's own code and the caller's. It takes effect when
// this is the first inclusion of Eigen in a translation unit.
#pragma once

#ifndef EIGEN_USE_THREADS
#define EIGEN_USE_THREADS
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

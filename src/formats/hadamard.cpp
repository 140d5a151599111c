// The per-group regular Hadamard rotation (see hadamard.h for the construction).
#include "formats/hadamard.h"

#include <cmath>

namespace nibble::formats {

namespace {
constexpr int kH4[4][4] = {{1, 1, 1, -1}, {1, 1, -1, 1}, {1, -1, 1, 1}, {-1, 1, 1, 1}};
}

bool is_power_of_4(int64_t n) {
  if (n <= 0) return false;
  while (n % 4 == 0) n /= 4;
  return n == 1;
}

int hadamard_sign(int64_t n, int64_t i, int64_t j) {
  int s = 1;
  for (int64_t m = n; m > 1; m /= 4, i /= 4, j /= 4) s *= kH4[i % 4][j % 4];
  return s;
}

void hadamard_rotate_groups(float* row, int64_t len, int64_t n) {
  // log4(n) butterfly passes; pass t mixes the elements whose indices differ only in digit t.
  // H_n is symmetric, so x·H_nᵀ = x·H_n: out[i] = Σ_j x[j]·Π_t H4[j_t][i_t], one digit per pass.
  const float norm = 1.0f / std::sqrt(float(n));  // exact: n = 4^p → 2^-p
  for (int64_t g = 0; g < len; g += n) {
    float* x = row + g;
    for (int64_t stride = 1; stride < n; stride *= 4) {
      for (int64_t base = 0; base < n; base += 4 * stride) {
        for (int64_t o = 0; o < stride; ++o) {
          float* p = x + base + o;
          const float a = p[0], b = p[stride], c = p[2 * stride], d = p[3 * stride];
          // y[i] = Σ_j H4[j][i]·x[j]
          p[0] = (a + b) + (c - d);
          p[stride] = (a + b) - (c - d);
          p[2 * stride] = (a - b) + (c + d);
          p[3 * stride] = (b - a) + (c + d);
        }
      }
    }
    for (int64_t k = 0; k < n; ++k) x[k] *= norm;
  }
}

}  // namespace nibble::formats

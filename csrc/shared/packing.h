// The canonical packed weight format (quantkern/reference/packing.py is the
// spec and has the bit diagrams). Torch-free and header-only: used by the CPU
// kernels (every ISA) and the CUDA kernels.
//
//   qweight [N, nb * bits] int32, nb = ceil(K / 32): 32-weight blocks along K.
//   4 bits: block j = bytes [16j, 16j + 16) of the row; byte p holds weight p
//           (low nibble) and weight p + 16 (high nibble).
//   2 bits: block j = bytes [8j, 8j + 8); bits 2f..2f+1 of byte p hold weight 8f + p.
//   3 bits: lo plane (2-bit layout of q & 3) in bytes [0, 8 nb), then the hi
//           plane: word 2 nb + j, bit t = bit 2 of weight t of block j.
//   w = (q - z) * s, z and s per (row, group), groups of whole blocks along K.
#pragma once

#include <cstdint>

#include "layout.h"
#include "qk_math.h"

namespace qk {

constexpr int kPackBlock = 32;

// Everything a kernel needs to read one packed weight (device-agnostic).
struct PackedW {
  const uint8_t* qw;   // row-major packed rows
  int64_t N, K;        // out_features, in_features
  int64_t nb;          // blocks per row = ceil(K / 32)
  int64_t row_bytes;   // nb * bits * 4
  int bits;            // 2, 3 or 4
  int64_t gblk;        // blocks per group (group_size / 32), or nb for one group per row
  int64_t G;           // groups per row
  const void* scales;  // [N, G]
  const void* zeros;   // [N, G]
  Dt mdt;              // dtype of scales and zeros
  int64_t Kp() const { return nb * kPackBlock; }
};

// The PackedW of an [N, K] weight at `bits` with groups of group_size (== K: one group per row).
inline PackedW packed_w(const uint8_t* qw, const void* scales, const void* zeros, Dt mdt, int64_t N, int64_t K,
                        int bits, int64_t group_size) {
  PackedW P;
  P.qw = qw;
  P.N = N;
  P.K = K;
  P.nb = (K + kPackBlock - 1) / kPackBlock;
  P.bits = bits;
  P.row_bytes = P.nb * bits * 4;
  P.gblk = group_size == K ? P.nb : group_size / kPackBlock;
  P.G = K / group_size;
  P.scales = scales;
  P.zeros = zeros;
  P.mdt = mdt;
  return P;
}

// Integer q of weight t (0..31) of block j of one packed row.
QK_HD int packed_q(const uint8_t* row, int bits, int64_t nb, int64_t j, int t) {
  if (bits == 4) {
    const uint8_t b = row[16 * j + (t & 15)];
    return t < 16 ? (b & 15) : (b >> 4);
  }
  const uint8_t lo = row[8 * j + (t & 7)];
  int q = (lo >> (2 * (t >> 3))) & 3;
  if (bits == 2) return q;
  const uint8_t hb = row[8 * nb + 4 * j + (t >> 3)];
  return q | (((hb >> (t & 7)) & 1) << 2);
}

// Inverse: set weight t of block j to q (the row must start zeroed).
QK_HD void packed_set(uint8_t* row, int bits, int64_t nb, int64_t j, int t, int q) {
  if (bits == 4) {
    row[16 * j + (t & 15)] |= uint8_t((q & 15) << (t < 16 ? 0 : 4));
    return;
  }
  row[8 * j + (t & 7)] |= uint8_t((q & 3) << (2 * (t >> 3)));
  if (bits == 3) row[8 * nb + 4 * j + (t >> 3)] |= uint8_t(((q >> 2) & 1) << (t & 7));
}

}  // namespace qk

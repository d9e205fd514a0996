// Typed loads and stores by storage type, for the span kernels. Included by the
// kernel headers inside namespace qk::QK_ISA_NS (after simd.h).
#pragma once

#define QK_SPAN_DISPATCH(dt, NAME, ...)                       \
  switch (dt) {                                               \
    case ::qk::Dt::F32: NAME<::qk::Dt::F32>(__VA_ARGS__); break; \
    case ::qk::Dt::F16: NAME<::qk::Dt::F16>(__VA_ARGS__); break; \
    case ::qk::Dt::BF16: NAME<::qk::Dt::BF16>(__VA_ARGS__); break; \
  }

namespace qk {
namespace QK_ISA_NS {

#if !defined(QK_ISA_SCALAR)
constexpr int kW = V::W;
template <Dt D>
QK_SI V vload(const void* p, int64_t i) {
  if constexpr (D == Dt::F32) return load(static_cast<const float*>(p) + i);
  else if constexpr (D == Dt::F16) return load_f16(static_cast<const uint16_t*>(p) + i);
  else return load_bf16(static_cast<const uint16_t*>(p) + i);
}
template <Dt D>
QK_SI void vstore(void* p, int64_t i, V v) {
  if constexpr (D == Dt::F32) store(static_cast<float*>(p) + i, v);
  else if constexpr (D == Dt::F16) store_f16(static_cast<uint16_t*>(p) + i, v);
  else store_bf16(static_cast<uint16_t*>(p) + i, v);
}
#else
constexpr int kW = 1;
#endif

template <Dt D>
QK_SI float sload(const void* p, int64_t i) {
  if constexpr (D == Dt::F32) return static_cast<const float*>(p)[i];
  else if constexpr (D == Dt::F16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  else return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
template <Dt D>
QK_SI void sstore(void* p, int64_t i, float v) {
  if constexpr (D == Dt::F32) static_cast<float*>(p)[i] = v;
  else if constexpr (D == Dt::F16) static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  else static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}

}  // namespace QK_ISA_NS
}  // namespace qk

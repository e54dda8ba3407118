/* kvq_layout.cuh: a quantized cache's layout as the tensor-core kernels' template arguments
 * (kvq_mma_supported's layouts): head_dim D, key and value bits KB and VB, keys grouped over KG
 * channels (0: over a chunk's tokens), values over VG channels (0: over a chunk's tokens, 32:
 * KIVI's), F8: fp8 pairs. Every kernel that reads the codes in place has one instantiation per
 * layout, chosen here once. */
#pragma once
#include "innerq.h"

/* make.template of<D, KB, VB, KG, VG, F8>() for p's layout; D is 64 or 128, the bits 2, 4 or 8. */
template <int D, int KB, int VB, bool F8, class Make> auto kvq_layout_g(const iq_kvq_params *p, Make make) {
  if (p->v_axis == IQ_AXIS_CHANNELS) return make.template of<D, KB, VB, 0, 32, F8>(); /* KIVI */
  if (p->k_axis == IQ_AXIS_TOKENS) return make.template of<D, KB, VB, 0, 0, F8>();
  switch (p->k_group) {
  case 16: return make.template of<D, KB, VB, 16, 0, F8>();
  case 32: return make.template of<D, KB, VB, 32, 0, F8>();
  case 64: return make.template of<D, KB, VB, 64, 0, F8>();
  default: return make.template of<D, KB, VB, (D < 128 ? D : 128), 0, F8>();
  }
}

template <int D, int KB, int VB, class Make> auto kvq_layout_m(const iq_kvq_params *p, Make make) {
  return p->meta == IQ_META_F16 ? kvq_layout_g<D, KB, VB, false>(p, make)
                                : kvq_layout_g<D, KB, VB, true>(p, make);
}

template <int D, int KB, class Make> auto kvq_layout_v(const iq_kvq_params *p, Make make) {
  switch (p->v_bits) {
  case 2: return kvq_layout_m<D, KB, 2>(p, make);
  case 4: return kvq_layout_m<D, KB, 4>(p, make);
  default: return kvq_layout_m<D, KB, 8>(p, make);
  }
}

template <int D, class Make> auto kvq_layout_k(const iq_kvq_params *p, Make make) {
  switch (p->k_bits) {
  case 2: return kvq_layout_v<D, 2>(p, make);
  case 4: return kvq_layout_v<D, 4>(p, make);
  default: return kvq_layout_v<D, 8>(p, make);
  }
}

template <class Make> auto kvq_layout(const iq_kvq_params *p, Make make) {
  return p->head_dim == 128 ? kvq_layout_k<128>(p, make) : kvq_layout_k<64>(p, make);
}

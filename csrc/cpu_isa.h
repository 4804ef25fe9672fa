// mrlhf._C: which x86 vector extension the CPU kernels use (decode_linear, decode_attention, row_softmax_stats).
//
// The best the CPU supports is chosen at first use. MRLHF_CPU_ISA=portable|avx2|avx512 in the environment, or the
// operator mrlhf::cpu_isa(str? use) at run time ("best" goes back to the best), picks a lower one (the tests run
// every path on one machine). Asking for more than the CPU has is an error, not a silent fallback.
#pragma once

#include <string>

namespace mrlhf {

enum class CpuIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa cpu_isa();             // the path in use
CpuIsa cpu_isa_supported();   // the best this CPU has
const char* cpu_isa_name(CpuIsa isa);

}  // namespace mrlhf

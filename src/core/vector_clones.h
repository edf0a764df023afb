// One clone of a hot loop per x86 vector width (AVX-512, AVX2, baseline), chosen at load time;
// nothing elsewhere (clang, sanitizers, other architectures).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define MIXDIFF_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MIXDIFF_VECTOR_CLONES
#endif

// kd_dsmem_scatter: can the general (CSR) vocab map's kernel take its teacher columns on chip? Its
// per-row kernel gathers each slot's teacher logit from global memory (2 bytes from a 32-byte sector,
// ~42k scattered ids a row at the Qwen3 -> GPT-2 shape), and those gathers bound it (20% of copy in
// minimum bytes, RESULTS.md session 28). The alternative: each block of a row's cluster bulk-copies a
// contiguous window of the teacher row and pushes every mapped column's value to the block that owns
// its slot, through distributed shared memory. This program times the four ways a row's ~42k slots can
// be served, each over 16,384 rows of an 8-block cluster (~5.3k a block): scattered stores to the
// cluster's blocks (st.shared::cluster, through mapa and through a generic pointer), the same stores to
// the block's own shared memory, scattered loads from the cluster's blocks (8 in flight a thread), and
// the global 2-byte gathers of today's kernel (8 in flight a thread, a 151,936-wide bf16 row), and the
// copy of the bytes such a call moves at least.
// What it showed (H100 80GB HBM3, 2026-12-07, benchmarks/NOTES.md session 29): remote stores 126 G/s
// (5.5 ms for the 16,384 rows), local stores 420-620 G/s, remote loads 52-54 G/s, global gathers 80 G/s
// (8.7 ms); the whole rows' bytes take 2.7 ms at copy speed. So a push through distributed shared memory
// would bound the kernel at ~5.5 ms against today's 8.0: 1.45x at best, not the 3x to the bytes. Only
// stores within a block are fast enough, i.e. a layout where a block owns both its slots and their
// teacher columns. Exit code 77 without a GPU.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "bench_cuda_util.cuh"

namespace {

namespace cg = cooperative_groups;
using kd_bench::or_exit;

__device__ __forceinline__ unsigned hash32(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

enum mode { remote_store, remote_store_generic, local_store, remote_load };

// Each block: `per` accesses to pseudo-random (block, slot) pairs of its cluster's slot caches (`chunk`
// floats a block); the caches are summed at the end so that nothing is optimised away.
template <mode M>
__global__ void scatter(int per, int chunk, float* sink) {
  extern __shared__ float cache[];
  cg::cluster_group cl = cg::this_cluster();
  const unsigned blocks = cl.num_blocks(), me = cl.block_rank();
  for (int i = threadIdx.x; i < chunk; i += blockDim.x) cache[i] = 0.f;
  cl.sync();  // every block's cache is live before another block touches it
  float acc = 0.f;
  const unsigned seed = blockIdx.x * 7919u;
  if constexpr (M == remote_load) {
    for (int e = threadIdx.x; e < per; e += blockDim.x * 8) {
      float v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const unsigned h = hash32(seed + e + k * blockDim.x);
        unsigned a;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(smem_u32(cache + (h >> 8) % chunk)), "r"(h % blocks));
        asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v[k]) : "r"(a));
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) acc += v[k];
    }
  } else {
    for (int e = threadIdx.x; e < per; e += blockDim.x) {
      const unsigned h = hash32(seed + e);
      const unsigned rank = M == local_store ? me : h % blocks, slot = (h >> 8) % chunk;
      const float y = static_cast<float>(e);
      if constexpr (M == remote_store_generic) {
        *cl.map_shared_rank(cache + slot, rank) = y;
      } else {
        unsigned a;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(smem_u32(cache + slot)), "r"(rank));
        asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(a), "f"(y) : "memory");
      }
    }
  }
  cl.sync();  // no block leaves while another may still write its cache
  for (int i = threadIdx.x; i < chunk; i += blockDim.x) acc += cache[i];
  if (acc == 12345.f) sink[0] = acc;
}

// Today's teacher side: 2-byte gathers at pseudo-random columns of a bf16 row, 8 in flight a thread.
__global__ void gather(const __nv_bfloat16* t, long long vt, int per, float* sink) {
  const __nv_bfloat16* row = t + static_cast<long long>(blockIdx.x / 8) * vt;
  float acc = 0.f;
  const unsigned seed = blockIdx.x * 7919u;
  for (int e = threadIdx.x; e < per; e += blockDim.x * 8) {
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = __bfloat162float(row[hash32(seed + e + k * blockDim.x) % vt]);
#pragma unroll
    for (int k = 0; k < 8; ++k) acc += v[k];
  }
  if (acc == 12345.f) sink[0] = acc;
}

// Milliseconds of the fastest of 5 runs (the first pays the cold caches).
template <class F>
float best_ms(F&& launch) {
  return static_cast<float>(kd_bench::time_calls(nullptr, launch, 5, kd_bench::statistic::best, 0).gpu_us / 1e3);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  or_exit(cudaGetDeviceProperties(&prop, 0), "properties");
  constexpr int rows = 16384, cluster = 8, slots = 42256, student = 50304;
  constexpr long long vt = 151936;
  const int per = (slots + cluster - 1) / cluster, chunk = (student + cluster - 1) / cluster;
  const double ops = static_cast<double>(rows) * cluster * per;
  float* sink = nullptr;
  or_exit(cudaMalloc(&sink, sizeof(float)), "malloc");
  std::printf("kd_dsmem_scatter: %s; %d rows, clusters of %d blocks, %d accesses a block\n\n", prop.name, rows, cluster, per);
  std::printf("| access | shared memory a block | ms | G accesses / s |\n|---|---:|---:|---:|\n");
  auto run = [&](auto kernel, const char* name, int extra) {
    const int smem = chunk * static_cast<int>(sizeof(float)) + extra;  // extra: a teacher window's room
    or_exit(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "attribute");
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = cluster;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(rows * cluster);
    cfg.blockDim = dim3(256);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.attrs = at;
    cfg.numAttrs = 1;
    const float ms = best_ms([&] { or_exit(cudaLaunchKernelEx(&cfg, kernel, per, chunk, sink), name); });
    std::printf("| %s | %d B | %.3f | %.1f |\n", name, smem, ms, ops / ms / 1e6);
  };
  for (int extra : {0, 48000}) {
    run(scatter<remote_store>, "store to the cluster's blocks (mapa + st.shared::cluster)", extra);
    run(scatter<remote_store_generic>, "store to the cluster's blocks (generic pointer)", extra);
    run(scatter<local_store>, "store to the block's own shared memory", extra);
    run(scatter<remote_load>, "load from the cluster's blocks, 8 in flight", extra);
  }
  __nv_bfloat16* t = nullptr;
  or_exit(cudaMalloc(&t, rows * vt * sizeof(__nv_bfloat16)), "malloc");
  or_exit(cudaMemset(t, 0, rows * vt * sizeof(__nv_bfloat16)), "memset");
  const float gms = best_ms([&] {
    gather<<<rows * cluster, 256>>>(t, vt, per, sink);
    or_exit(cudaGetLastError(), "gather");
  });
  std::printf("| global 2-byte gathers, 8 in flight (today's kernel) | - | %.3f | %.1f |\n", gms, ops / gms / 1e6);
  cudaFree(t);
  // The bytes a CSR call moves at least with whole rows: the teacher row and the student row read, the
  // gradient row written; a copy of that many bytes reads and writes half of them each.
  const size_t half_bytes = static_cast<size_t>(rows) * (vt + 2 * student) * sizeof(__nv_bfloat16) / 2;
  void *x = nullptr, *y = nullptr;
  or_exit(cudaMalloc(&x, half_bytes), "malloc");
  or_exit(cudaMalloc(&y, half_bytes), "malloc");
  const float cms = best_ms([&] { or_exit(cudaMemcpyAsync(y, x, half_bytes, cudaMemcpyDeviceToDevice), "copy"); });
  std::printf("\nThe rows' bytes (%.2f GB) at copy speed: %.3f ms (%.2f TB/s)\n", 2.0 * half_bytes / 1e9, cms,
              2.0 * half_bytes / cms / 1e9);
  cudaFree(x);
  cudaFree(y);
  cudaFree(sink);
  return 0;
}

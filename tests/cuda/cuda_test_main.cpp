// Shared main of the GPU tests: with no CUDA device (fewer than KD_TEST_MIN_DEVICES for the multi-GPU
// tests) the run is reported as skipped (exit 77, which ctest maps to "Skipped"), never as passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#ifndef KD_TEST_MIN_DEVICES
#define KD_TEST_MIN_DEVICES 1
#endif

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices < KD_TEST_MIN_DEVICES) {
    std::printf("SKIPPED: %s (%s)\n", KD_TEST_MIN_DEVICES > 1 ? "needs several CUDA devices" : "no CUDA device",
                e == cudaSuccess ? (std::to_string(devices) + " devices").c_str() : cudaGetErrorString(e));
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}

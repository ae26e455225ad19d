// The CUDA build of kd_model (see kd_model.cpp): same program, with --backend cuda and bench.
#define KD_MODEL_CUDA 1
#include "kd_model.cpp"

// kd_train with the CUDA backend: the same program (kd_train.cpp), compiled by nvcc with KD_TRAIN_CUDA.
#include "kd_train.cpp"

"""Process groups and device set-up (NCCL on GPU, gloo + the CPU shim without CUDA)."""

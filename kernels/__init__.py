"""dsv41.kernels"""

"""dsv41.quantization"""

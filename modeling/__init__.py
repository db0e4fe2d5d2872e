"""dsv41.modeling"""

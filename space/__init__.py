"""dsv41.space"""

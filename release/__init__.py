"""dsv41.release"""

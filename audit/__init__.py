"""dsv41.audit"""

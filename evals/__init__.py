"""dsv41.evals"""

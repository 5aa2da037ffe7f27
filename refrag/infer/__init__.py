"""refrag.infer"""

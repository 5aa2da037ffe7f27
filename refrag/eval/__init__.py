"""refrag.eval"""

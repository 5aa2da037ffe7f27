"""refrag.retrieval"""

"""refrag.data"""

"""refrag.model"""

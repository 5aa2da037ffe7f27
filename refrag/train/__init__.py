"""refrag.train"""

"""Kernel stages and helpers shared by several ops."""

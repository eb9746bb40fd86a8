"""chatd.ops"""

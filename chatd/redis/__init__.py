"""chatd.redis"""

"""chatd.store"""

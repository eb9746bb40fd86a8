"""chatd.wire"""

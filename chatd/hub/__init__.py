"""chatd.hub"""

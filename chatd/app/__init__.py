"""chatd.app"""

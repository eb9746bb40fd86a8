"""chatd.client"""

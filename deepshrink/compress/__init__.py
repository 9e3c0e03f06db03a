"""Compression methods. Each family: typed configs + registered apply functions."""

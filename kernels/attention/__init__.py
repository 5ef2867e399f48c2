"""unirank.kernels.attention"""

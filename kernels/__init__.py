"""unirank.kernels"""

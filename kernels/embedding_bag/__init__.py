"""unirank.kernels.embedding_bag"""

"""unirank.training"""

"""unirank.serving"""

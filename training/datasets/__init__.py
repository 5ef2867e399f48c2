"""unirank.training.datasets"""

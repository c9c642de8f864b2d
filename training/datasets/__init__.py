"""training/datasets"""

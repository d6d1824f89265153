"""Recurrent scans with explicit truncated-BPTT semantics, remat and masks; RNN/GRU/LSTM cells.

Read the truncation semantics in the docstring of :func:`scan` before choosing a mode.
"""

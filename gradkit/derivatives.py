"""Derivative helpers over pytrees: jacobian, hessian, hvp, jvp (Rop), vjp (Lop).

Also :func:`expression`, which turns a traced function or its derivative into a readable formula.
"""

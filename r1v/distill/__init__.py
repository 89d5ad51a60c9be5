"""Adaptive-length chain-of-thought distillation (METHOD.md section 4): QDAM and VTIA scores (`cues`, `quality`),
the DRLC repetition penalty (`drlc`), self-distillation (`distill`) and their stage kinds (`stage`).
"""

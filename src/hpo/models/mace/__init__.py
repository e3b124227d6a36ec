"""MACE potentials (mace-torch): the training engine, its parameter table and measurements (README.md here).

Not yet a registered model kind: the kind protocol (fit/evaluate/load/calculator) is being rewritten; the
engine is what that kind will wrap. Importing this package imports neither torch nor mace-torch.
"""

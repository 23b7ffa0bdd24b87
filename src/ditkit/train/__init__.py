"""Training: the loop (``ditkit.train.loop.train``), EMA, checkpoints, precision helpers.

Import the submodules directly; this package imports nothing so that reading a checkpoint
(``ditkit.train.checkpoint``) does not pull in the training loop.
"""

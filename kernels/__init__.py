"""Fused ops for upcli, imported as ``upcli.kernels``.

Empty until the kernel issue fills it with ``adaptive_conv``, ``pac_conv`` and ``neighbour_logits``.
"""

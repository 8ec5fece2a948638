"""Pure-torch building blocks of the SSL methods.

Nothing under this package imports nnunetv2 (a test enforces it), so every piece can be unit-tested
in milliseconds and reused outside nnU-Net. Tensors follow nnU-Net's layout: ``(B, C, *spatial)``
with the class/channel axis at dim 1 and ``spatial`` = ``(H, W)`` or ``(D, H, W)``.
"""

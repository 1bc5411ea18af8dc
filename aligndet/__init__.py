"""aligndet: AlignDet (ICCV 2023) in plain PyTorch."""
__version__ = "0.1.0"

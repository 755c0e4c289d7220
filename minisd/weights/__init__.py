"""Weights: the minisd file format's conversions from and to official checkpoints and diffusers
folders."""

"""Entropy coding: the deterministic integer entropy model and the `.lic` bitstream container."""

"""Discrete image autoencoding (the ImageNet benchmark) driven by Accelerate."""

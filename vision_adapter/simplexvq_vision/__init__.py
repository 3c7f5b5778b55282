"""simplexvq_vision: a thin timm-backed image autoencoder around any simplexvq quantizer."""

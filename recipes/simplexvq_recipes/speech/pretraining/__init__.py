"""wav2vec 2.0 pretraining with a simplexvq quantizer: config, model, losses, masking, validation, training."""

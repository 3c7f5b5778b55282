"""wav2vec 2.0 pretraining with simplexvq quantizers, driven by Accelerate; downstream features."""

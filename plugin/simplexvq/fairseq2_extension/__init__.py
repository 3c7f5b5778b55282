"""fairseq2 0.8.1 extension: wav2vec2 model families whose quantizer is a simplexvq quantizer."""

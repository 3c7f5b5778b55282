"""Speech data: audio reading, manifests, datasets and batching, the offline corpora (fillets-ng speech, espeak-ng synthetic speech)."""

"""Speech data: audio reading, manifests, datasets and batching; the offline corpora (fillets-ng, espeak-ng)."""

"""Using a pretrained model: feature and code extraction, the ASR probe, exports."""

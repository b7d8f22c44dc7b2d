"""Training loops: pretraining (and, built on the same pieces, fine-tuning)."""

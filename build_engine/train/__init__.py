"""Training: augmentation, EMA, learning-rate schedule and the trainer loop."""

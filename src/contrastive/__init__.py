"""Contrastive representation learning pipeline."""

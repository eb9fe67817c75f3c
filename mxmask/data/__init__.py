"""Datasets: COCO loading, the synthetic shapes generator, transforms and batching."""

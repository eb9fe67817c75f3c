"""Datasets: COCO loading and validation, image decoding, the synthetic shapes generator,
transforms, batching and the worker-process loader."""

"""Layer 7, ml: what training code uses on top of the worker client: the PyTorch modules
(adapm.torch) and the intent-signaling data loader (adapm.data)."""

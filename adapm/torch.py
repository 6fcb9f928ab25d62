"""Public name `adapm.torch`: PyTorch modules on AdaPM (Embedding, EmbeddingBag). The code
lives in its layer, `adapm.ml.torch`; importing this name gives that very module, so
`adapm.torch.X is adapm.ml.torch.X`."""
import sys

from adapm.ml import torch as _module

sys.modules[__name__] = _module

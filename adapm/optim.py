"""Public name `adapm.optim`: the fused sparse optimizers (SGD, Adagrad, RowWiseAdagrad, Adam).
The code lives in its layer, `adapm.table.optimizers`; importing this name gives that very
module, so `adapm.optim.X is adapm.table.optimizers.X`."""
import sys

from adapm.table import optimizers as _module

sys.modules[__name__] = _module

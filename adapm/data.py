"""Public name `adapm.data`: the intent-signaling loader (IntentLoader). The code lives in its
layer, `adapm.ml.data`; importing this name gives that very module, so `adapm.data.X is
adapm.ml.data.X`."""
import sys

from adapm.ml import data as _module

sys.modules[__name__] = _module

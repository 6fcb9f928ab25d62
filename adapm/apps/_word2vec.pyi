"""Type stub of the word2vec app's compiled step (src/_word2vec.pyx)."""
import numpy as np

class KeyIndex:
    num_keys: int
    def __init__(self, num_keys: int) -> None: ...
    def index(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

def train_pairs(rows: np.ndarray, inverse: np.ndarray, pairs: int, negatives: int,
                alpha: float, alpha_end: float, adagrad: bool = False,
                eps: float = 1e-8) -> float: ...

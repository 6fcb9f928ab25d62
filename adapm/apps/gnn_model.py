"""The GNN app's model (adapm.apps.gnn): a node's sampled 2-hop neighbourhood, the
two-layer GraphSAGE module over it, and its accuracy."""

import numpy as np
import torch

EVAL_BATCH = 2048          # nodes per evaluation batch
EVAL_SEED = 12345          # the evaluation's neighbourhood samples: the same every time


# -- neighbourhood sampling ------------------------------------------------------------

def sample_neighbours(indptr, indices, nodes, fanout, rng):
    """(len(nodes), fanout) neighbours of each node, drawn uniformly with replacement
    from its adjacency; a node without neighbours gets itself `fanout` times."""
    nodes = np.asarray(nodes, dtype=np.int64)
    start = indptr[nodes]
    degree = indptr[nodes + 1] - start
    if indices.shape[0] == 0:
        return np.repeat(nodes[:, None], fanout, axis=1)
    pos = start[:, None] + (rng.random((nodes.shape[0], fanout)) * degree[:, None]).astype(
        np.int64)
    picked = indices[np.minimum(pos, indices.shape[0] - 1)]
    return np.where(degree[:, None] > 0, picked, nodes[:, None])


class Batch:
    """A minibatch of target nodes and their sampled 2-hop neighbourhood, as the node ids
    of one Embedding call: ids = [targets (B) | their f1 neighbours each (B f1) | f2
    neighbours of each of those B (1 + f1) nodes]."""

    def __init__(self, targets, ids, labels, fanouts):
        self.targets, self.ids, self.labels, self.fanouts = targets, ids, labels, fanouts

    def __len__(self):
        return self.targets.shape[0]


def sample_batch(graph, targets, fanouts, rng):
    """The Batch of `targets` with neighbourhoods drawn from rng."""
    f1, f2 = fanouts
    targets = np.asarray(targets, dtype=np.int64)
    hop1 = sample_neighbours(graph.indptr, graph.indices, targets, f1, rng)
    layer1 = np.concatenate([targets, hop1.reshape(-1)])
    hop2 = sample_neighbours(graph.indptr, graph.indices, layer1, f2, rng)
    ids = np.concatenate([layer1, hop2.reshape(-1)])
    return Batch(targets, ids, graph.labels[targets], (f1, f2))


# -- the model -------------------------------------------------------------------------

class Sage(torch.nn.Module):
    """The dense part of a two-layer GraphSAGE with mean aggregation:
    h_v = relu(W1 [x_v | mean of x over v's f2 sampled neighbours]) for the targets and
    their sampled neighbours, logits_v = W2 [h_v | mean of h over v's f1 neighbours]."""

    def __init__(self, dim, hidden, classes):
        super().__init__()
        self.layer1 = torch.nn.Linear(2 * dim, hidden)
        self.layer2 = torch.nn.Linear(2 * hidden, classes)

    def forward(self, x, batch_size, fanouts):
        """x: the rows of a Batch's ids (B (1 + f1) (1 + f2), dim) -> (B, classes)."""
        f1, f2 = fanouts
        n1 = batch_size * (1 + f1)
        dim = x.shape[1]
        neighbours = x[n1:].reshape(n1, f2, dim).mean(dim=1)
        h = torch.relu(self.layer1(torch.cat([x[:n1], neighbours], dim=1)))
        h_neighbours = h[batch_size:].reshape(batch_size, f1, h.shape[1]).mean(dim=1)
        return self.layer2(torch.cat([h[:batch_size], h_neighbours], dim=1))


def sage_module(dim, hidden, classes, seed):
    """The same seed in every worker: DDP then starts from identical copies."""
    torch.manual_seed(seed)
    return Sage(dim, hidden, classes)


def accuracy(predict, graph, nodes, fanouts, batch=EVAL_BATCH):
    """Share of `nodes` whose predicted class (argmax of predict(Batch)) is their label;
    neighbourhoods drawn from a fixed seed, so that every evaluation of the same nodes
    sees the same samples."""
    if len(nodes) == 0:
        return float("nan")
    rng = np.random.default_rng(EVAL_SEED)
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(nodes), batch):
            b = sample_batch(graph, nodes[lo:lo + batch], fanouts, rng)
            correct += int((predict(b).argmax(dim=1).numpy() == b.labels).sum())
    return correct / len(nodes)

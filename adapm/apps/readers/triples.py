"""Tab-separated triples (head, relation, tail) of names, as ids into the file's entity
and relation names; merge_triples puts the ids of several files into one numbering."""

import os
from typing import NamedTuple

import numpy as np

from adapm.apps.readers.cache import cached
from adapm.apps.readers.parsing import (
    PARSES,
    InputError,
    arrow_options,
    pyarrow_csv,
    stack,
    str_array,
)


class Triples(NamedTuple):
    """(head, relation, tail) triples: ids (n, 3) int64 into `entities` (heads and tails)
    and `relations`, the sorted distinct names (str arrays) of the file."""
    ids: np.ndarray
    entities: np.ndarray
    relations: np.ndarray

    def names(self):
        """The triples as names, a str array (n, 3)."""
        e, r, ids = self.entities, self.relations, self.ids
        return np.column_stack([e[ids[:, 0]], r[ids[:, 1]], e[ids[:, 2]]]).reshape(-1, 3)


def read_triples(path, cache=False):
    """A tab-separated file of `head<TAB>relation<TAB>tail` names (UTF-8) as Triples.
    Blank lines (empty or whitespace only) are skipped; any other line must have exactly
    three non-empty fields. cache=True: parsed once per machine (adapm.apps.readers)."""
    path = os.fspath(path)

    def parse():
        PARSES["triples"] += 1
        arrow = pyarrow_csv()
        found = _triples_arrow(arrow, path) if arrow is not None else None
        return (found if found is not None else _triples_python(path)), {}

    arrays = cached("triples", path, [], parse)[0] if cache else parse()[0]
    return Triples(arrays["ids"], arrays["entities"], arrays["relations"])


def merge_triples(parts):
    """Ids over several files: entities and relations numbered in the sorted order of
    their names over all `parts` (Triples). Returns (id arrays, entity names, relation
    names)."""
    if not parts:
        raise ValueError("no triples given")
    if len(parts) == 1:
        return [parts[0].ids], parts[0].entities, parts[0].relations
    entities = np.unique(np.concatenate([p.entities for p in parts]))
    relations = np.unique(np.concatenate([p.relations for p in parts]))
    ids = []
    for p in parts:
        e = np.searchsorted(entities, p.entities)
        r = np.searchsorted(relations, p.relations)
        ids.append(np.column_stack([e[p.ids[:, 0]], r[p.ids[:, 1]], e[p.ids[:, 2]]])
                   .astype(np.int64).reshape(-1, 3))
    return ids, entities, relations


def _triples_arrow(arrow, path):
    """The triples' arrays, or None where the plain path must decide (a malformed or
    blank-only line, an empty field, a byte-order mark)."""
    pa, csv, pc = arrow
    with open(path, "rb") as f:
        if f.read(3) == b"\xef\xbb\xbf":  # Python keeps it in the first name; pyarrow not
            return None
    names = ["h", "r", "t"]
    try:
        table = csv.read_csv(path, **arrow_options(arrow, names, dict.fromkeys(
            names, pa.string()), "\t"))
    except (pa.ArrowInvalid, ValueError):
        return None
    h, r, t = (table.column(name) for name in names)
    entities = pc.unique(pa.chunked_array(h.chunks + t.chunks, type=pa.string()))
    relations = pc.unique(r)
    entities = entities.take(pc.array_sort_indices(entities))
    relations = relations.take(pc.array_sort_indices(relations))
    entity_names, relation_names = entities.to_pylist(), relations.to_pylist()
    for names in (entity_names, relation_names):
        # an empty or blank field (maybe a blank line): the plain path decides
        if any(not name or name.isspace() for name in names):
            return None
    ids = stack([pc.index_in(column, value_set=vocabulary).to_numpy() for column, vocabulary
                  in ((h, entities), (r, relations), (t, entities))], np.int64, table.num_rows)
    return {"ids": ids, "entities": str_array(entity_names),
            "relations": str_array(relation_names)}


def _triples_python(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")  # universal newlines: as iterating over f
    kept = [line for line in lines if line and not line.isspace()]
    if any(line.count("\t") != 2 for line in kept):
        _triples_locate(path, lines)
    flat = "\t".join(kept).split("\t") if kept else []
    heads, relations, tails = flat[0::3], flat[1::3], flat[2::3]
    entity_set, relation_set = set(heads), set(relations)
    entity_set.update(tails)
    if "" in entity_set or "" in relation_set:
        _triples_locate(path, lines)
    entities, relations_sorted = sorted(entity_set), sorted(relation_set)
    e_index = {name: i for i, name in enumerate(entities)}
    r_index = {name: i for i, name in enumerate(relations_sorted)}
    ids = stack([np.fromiter(map(index.__getitem__, column), dtype=np.int64, count=len(kept))
                  for column, index in ((heads, e_index), (relations, r_index),
                                        (tails, e_index))], np.int64, len(kept))
    return {"ids": ids, "entities": str_array(entities),
            "relations": str_array(relations_sorted)}


def _triples_locate(path, lines):
    """Raise an InputError naming the first malformed line."""
    for number, line in enumerate(lines, 1):
        if not line or line.isspace():
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not all(fields):
            raise InputError(f"{path}:{number}: expected head<TAB>relation<TAB>tail, got "
                             f"{line!r}")
    raise InputError(f"{path}: malformed triples")  # (not reached)

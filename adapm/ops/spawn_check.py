"""Whether a spawned process can import a function (adapm.run's fn and init): a clear
TypeError before any process starts, instead of multiprocessing's AttributeError or
PicklingError in a child."""

import ast
import functools
import os
import pickle
import sys
import types
from multiprocessing.reduction import ForkingPickler

SPAWN_ADVICE = ("Worker processes are started with multiprocessing's spawn method: each "
                "imports {what} by its module and name. Define {what} with def at module "
                "level of a .py file and import it from there (extra arguments go through "
                "args= and kwargs=, or a functools.partial of such a function).")


def check_importable(fn, what="fn"):
    """Raise TypeError, saying why and what to do, when a spawned process could not
    import `fn` (pickled by reference, as multiprocessing's spawn sends it): a lambda, a
    function defined in another function, a functools.partial of those (pickling fails);
    a function of __main__ that a spawned process does not define: __main__ of an
    interactive session (a notebook, the prompt, python -c), of a package (python -m
    pkg), or a script's definition inside `if __name__ == "__main__":` (a spawned
    process runs the script as __mp_main__, skipping that block)."""
    pickler = _MainReferences()
    try:
        pickler.dump(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(f"adapm.run: {what} {describe(fn)} cannot be sent to the worker "
                        f"processes: {exc}. A lambda, a function defined inside another "
                        f"function, and a functools.partial of either cannot be. "
                        f"{SPAWN_ADVICE.format(what=what)}") from None
    if not pickler.main_names:
        return
    missing, where = _undefined_in_spawned_main(pickler.main_names)
    if missing:
        raise TypeError(f"adapm.run: {what} {describe(fn)} cannot be imported by the worker "
                        f"processes: a spawned process's __main__ has no "
                        f"{', '.join(sorted(missing))}, since {where}. "
                        f"{SPAWN_ADVICE.format(what=what)}")


class _Discard:
    def write(self, data):
        return len(data)


class _MainReferences(ForkingPickler):
    """Pickles as spawn sends a process's arguments (into nothing), noting the top-level
    names of every function and class it takes by reference from __main__."""

    def __init__(self):
        super().__init__(_Discard())
        self.main_names = set()

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, type)) and \
                getattr(obj, "__module__", None) == "__main__":
            self.main_names.add(obj.__qualname__.split(".")[0])
        return NotImplemented


def _undefined_in_spawned_main(names):
    """(the names of `names` that __main__ of a spawned process does not define, why):
    multiprocessing.spawn re-imports __main__ by its module name (python -m) or its path,
    as __mp_main__, except a package's __main__ or an interactive session's; nothing is
    missing where that cannot be told (the file cannot be read, a star import)."""
    main = sys.modules["__main__"]
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None:
        if spec_name == "__main__" or spec_name.endswith(".__main__"):
            return set(names), (f"__main__ is {spec_name}, a package's __main__, never "
                                "imported again")
        path = getattr(main.__spec__, "origin", None)
    else:
        path = getattr(main, "__file__", None)
        if path is None or not os.path.isfile(path):  # '<stdin>' for `python -`
            return set(names), ("__main__ is an interactive session (a notebook, the "
                                "Python prompt, python -c, a script on stdin), which has "
                                "no file to import")
        if os.path.splitext(os.path.basename(path))[0] == "ipython":
            return set(names), "__main__ is an IPython session, which has no file to import"
    defined = _defined_on_import(path) if path else None
    if defined is None:
        return set(), ""
    missing = {name for name in names if name not in defined}
    return missing, (f"{path} defines it only inside `if __name__ == \"__main__\":` (or "
                     "not at module level), a block that a spawned process skips (it runs "
                     "the file as __mp_main__)")


class _Unknown(Exception):
    pass


def _defined_on_import(path):
    """The names a module-level run of the file at `path` binds when __name__ is not
    "__main__", or None when that cannot be told."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    names = set()
    try:
        _bound(tree.body, names)
    except _Unknown:
        return None
    return names


def _bound(nodes, names):
    """Add the names `nodes` bind at module level; raise _Unknown where code can bind
    names unseen (a star import, globals(), exec)."""
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    raise _Unknown
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.If) and _is_main_guard(node.test):
            _bound(node.orelse, names)
        elif isinstance(node, ast.Lambda):
            continue
        else:
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("globals", "vars", "exec", "eval", "setattr",
                                     "__import__"):
                raise _Unknown
            _bound(ast.iter_child_nodes(node), names)


def _is_main_guard(test):
    """`__name__ == "__main__"`, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and
            isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and \
        any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)


def describe(fn):
    if isinstance(fn, functools.partial):
        return f"functools.partial({describe(fn.func)}, ...)"
    name = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if name is None:
        return repr(fn)
    return f"{module}.{name}" if module else name

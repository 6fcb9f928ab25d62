"""SLURM's compressed host lists, as in SLURM_JOB_NODELIST, without `scontrol`.

    >>> expand("node[01-03,07],gpu5")
    ['node01', 'node02', 'node03', 'node07', 'gpu5']
    >>> expand("rack[1-2]-n[8-9]")
    ['rack1-n8', 'rack1-n9', 'rack2-n8', 'rack2-n9']

A list is hosts separated by commas; a host is text with any number of bracket groups,
each a comma-separated list of numbers and ranges LOW-HIGH. A range keeps the width of
its LOW as zero padding (`[08-10]`: 08, 09, 10; `[8-10]`: 8, 9, 10). Several groups
expand as nested loops, the leftmost outermost, as SLURM does. Anything else (unbalanced
or nested brackets, an empty host or range, a range that runs backwards, letters in a
range) is a ValueError that names the list and the position."""

__all__ = ["expand", "first_host", "iter_hosts", "parse"]


def expand(text):
    """Every host of the list, in order."""
    return list(iter_hosts(text))


def first_host(text):
    """The list's first host (SLURM's node 0 of a job or step), the whole list checked but
    not expanded: `node[0-999999]` costs nothing."""
    return next(iter_hosts(text))


def iter_hosts(text):
    """The hosts of the list, one by one (the whole list is checked first)."""
    items = parse(text)
    return (host for item in items for host in _expand_item(item))


def parse(text):
    """The list as items, each a list of parts: a str, or a list of (low, high, width)
    ranges of one bracket group."""
    if not isinstance(text, str):
        raise TypeError(f"a host list is a str, not {type(text).__name__}")
    source = text
    text = text.strip()
    if not text:
        raise ValueError("empty host list")
    items, parts, literal = [], [], []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "[":
            close = text.find("]", i + 1)
            if close < 0:
                raise _error(source, text, i, "'[' without ']'")
            inner = text[i + 1:close]
            if "[" in inner:
                raise _error(source, text, i + 1 + inner.index("["), "nested '['")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_ranges(source, text, inner, i + 1))
            i = close + 1
            continue
        if char == "]":
            raise _error(source, text, i, "']' without '['")
        if char == ",":
            items.append(_item(source, text, parts, literal, i))
            parts, literal = [], []
        elif char.isspace() or not char.isprintable():
            raise _error(source, text, i, f"{char!r} in a host name")
        else:
            literal.append(char)
        i += 1
    items.append(_item(source, text, parts, literal, len(text)))
    return items


def _item(source, text, parts, literal, at):
    if literal:
        parts.append("".join(literal))
    if not parts:
        raise _error(source, text, at, "empty host name")
    return parts


def _ranges(source, text, inner, start):
    """The (low, high, width) ranges of one bracket group's contents."""
    ranges = []
    offset = start
    for piece in inner.split(","):
        low, dash, high = piece.partition("-")
        if not piece:
            raise _error(source, text, offset, "empty range in '[...]'")
        if not _digits(low) or (dash and not _digits(high)):
            raise _error(source, text, offset,
                         f"{piece!r} in '[...]': expected NUMBER or LOW-HIGH")
        first = int(low)
        last = int(high) if dash else first
        if last < first:
            raise _error(source, text, offset, f"range {piece!r} runs backwards")
        ranges.append((first, last, len(low)))
        offset += len(piece) + 1
    return ranges


def _digits(text):
    return text.isascii() and text.isdigit()


def _expand_item(parts, prefix=""):
    """The hosts of one item, lazily: the leftmost group varies slowest."""
    if not parts:
        yield prefix
        return
    part, rest = parts[0], parts[1:]
    if isinstance(part, str):
        yield from _expand_item(rest, prefix + part)
        return
    for first, last, width in part:
        for number in range(first, last + 1):
            yield from _expand_item(rest, f"{prefix}{number:0{width}d}")


def _error(source, text, at, what):
    where = ("at the end" if at >= len(text)
             else f"at character {at + len(source) - len(source.lstrip()) + 1}")
    return ValueError(f"malformed host list {source!r} {where}: {what}")

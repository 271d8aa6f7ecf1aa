"""`--where` filters: a small Python-expression language translated (never eval'd) to pyarrow.

    tempo_bpm >= 100 and tempo_bpm < 130            100 <= tempo_bpm < 130
    key_name == 'A minor'                           mode in ['minor', 'dorian']
    'calm' in moods                                 'calm' not in moods      (list columns)
    'piano' in caption                              (substring of a string column)
    len(moods) >= 2    startswith(source_path, '/data/yt')    contains(prompt, 'drums')
    is_null(tempo_bpm)    not has_latent    has_latent == True

Scalar parts become a pyarrow.dataset expression pushed down to the parquet scan (row groups are
skipped by their statistics); list membership has no pyarrow expression, so it is applied per
record batch after the scan (`Where.mask`)."""
from __future__ import annotations

import ast
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

COMPARE = {ast.Eq: "equal", ast.NotEq: "not_equal", ast.Lt: "less", ast.LtE: "less_equal",
           ast.Gt: "greater", ast.GtE: "greater_equal"}
FUNCTIONS = ("len", "contains", "startswith", "endswith", "is_null")


class WhereError(ValueError):
    pass


class _NotPushable(Exception):
    pass


class Where:
    def __init__(self, text: str, schema: pa.Schema):
        self.text, self.schema = text, schema
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            raise WhereError(f"cannot parse --where {text!r}: {exc.msg}") from None
        self.columns: set[str] = set()
        self._check(self.tree)
        terms = self.tree.values if isinstance(self.tree, ast.BoolOp) and isinstance(self.tree.op, ast.And) else [self.tree]
        pushed, self.complete = [], True
        for term in terms:  # each AND term pushes down on its own; the rest waits for mask()
            try:
                pushed.append(self._build(term, expr=True))
            except _NotPushable:
                self.complete = False
        self.expression = None
        for e in pushed:
            self.expression = e if self.expression is None else self.expression & e

    def mask(self, batch: pa.RecordBatch) -> pa.Array:
        return self._build(self.tree, expr=False, batch=batch)

    def _check(self, node: ast.AST) -> None:
        """Reject anything outside the language before building, naming what is wrong."""
        if isinstance(node, ast.Name):
            if node.id in ("True", "False", "None"):
                return
            if node.id not in self.schema.names:
                raise WhereError(f"unknown column {node.id!r} in --where; columns are: {', '.join(self.schema.names)}")
            self.columns.add(node.id)
            return
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise WhereError(f"unknown function in --where (known: {', '.join(FUNCTIONS)})")
            for arg in node.args:
                self._check(arg)
            return
        allowed = (ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.Compare, ast.Constant,
                   ast.List, ast.Tuple, ast.Load, ast.In, ast.NotIn, *COMPARE)
        if not isinstance(node, allowed):
            raise WhereError(f"--where does not allow {type(node).__name__} ({ast.unparse(node)!r})")
        for child in ast.iter_child_nodes(node):
            self._check(child)

    def _build(self, node: ast.AST, expr: bool, batch: pa.RecordBatch | None = None) -> Any:
        def sub(n):
            return self._build(n, expr, batch)

        if isinstance(node, ast.BoolOp):
            parts = [sub(v) for v in node.values]
            fn = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
            out = parts[0]
            for p in parts[1:]:
                out = fn(out, p)
            return out
        if isinstance(node, ast.UnaryOp):
            value = sub(node.operand)
            return pc.invert(value) if isinstance(node.op, ast.Not) else pc.negate(value)
        if isinstance(node, ast.Constant):
            # In an expression a constant must be an Expression too (pc.less_equal(100, field) fails).
            return pc.scalar(node.value) if expr and node.value is not None else node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self._literal(e) for e in node.elts]
        if isinstance(node, ast.Name):
            if node.id in ("True", "False", "None"):
                value = {"True": True, "False": False, "None": None}[node.id]
                return pc.scalar(value) if expr and value is not None else value
            return pc.field(node.id) if expr else batch.column(node.id)
        if isinstance(node, ast.Call):
            return self._call(node, expr, batch)
        if isinstance(node, ast.Compare):
            out, left = None, node.left
            for op, right in zip(node.ops, node.comparators):
                term = self._compare(op, left, right, expr, batch)
                out = term if out is None else pc.and_kleene(out, term)
                left = right
            return out
        raise WhereError(f"--where does not allow {ast.unparse(node)!r}")

    def _literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -node.operand.value
        raise WhereError(f"--where needs a constant here, not {ast.unparse(node)!r}")

    def _compare(self, op, left, right, expr, batch):
        lhs, rhs = self._build(left, expr, batch), self._build(right, expr, batch)
        if isinstance(op, (ast.In, ast.NotIn)):
            if isinstance(right, (ast.List, ast.Tuple)):
                out = pc.is_in(lhs, value_set=pa.array(rhs))
            elif isinstance(right, ast.Name) and pa.types.is_list(self.schema.field(right.id).type):
                if expr:
                    raise _NotPushable
                out = _list_contains(rhs, self._literal(left))
            elif isinstance(right, ast.Name) and pa.types.is_string(self.schema.field(right.id).type):
                out = pc.match_substring(rhs, pattern=str(self._literal(left)))
            else:
                raise WhereError(f"'in' needs a [list], a list column or a text column on its right: {ast.unparse(right)!r}")
            return pc.invert(out) if isinstance(op, ast.NotIn) else out
        if lhs is None or rhs is None:  # `x == None` reads as a null test, as a user means it
            other = rhs if lhs is None else lhs
            isnull = pc.is_null(other)
            if isinstance(op, ast.Eq):
                return isnull
            if isinstance(op, ast.NotEq):
                return pc.invert(isnull)
            raise WhereError("only == and != compare with None")
        return getattr(pc, COMPARE[type(op)])(lhs, rhs)

    def _call(self, node: ast.Call, expr, batch):
        name, args = node.func.id, [self._build(a, expr, batch) for a in node.args]
        want = {"len": 1, "is_null": 1}.get(name, 2)
        if len(args) != want:
            raise WhereError(f"{name}() takes {want} argument(s)")
        if name == "len":
            if expr and isinstance(node.args[0], ast.Name) and pa.types.is_list(self.schema.field(node.args[0].id).type):
                raise _NotPushable  # list lengths have no pushed-down kernel in every pyarrow version
            return pc.list_value_length(args[0]) if not _is_text(self.schema, node.args[0]) else pc.utf8_length(args[0])
        if name == "is_null":
            return pc.is_null(args[0])
        fn = {"contains": pc.match_substring, "startswith": pc.starts_with, "endswith": pc.ends_with}[name]
        return fn(args[0], pattern=str(self._literal(node.args[1])))


def _is_text(schema: pa.Schema, node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and pa.types.is_string(schema.field(node.id).type)


def _list_contains(lists: pa.Array, value: Any) -> pa.Array:
    """Row i is true when value is among lists[i]: one vectorised pass over the flattened values."""
    import numpy as np

    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    hits = pc.equal(pc.list_flatten(lists), pa.scalar(value)).fill_null(False)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    out = np.zeros(len(lists), dtype=bool)
    out[parents[hits.to_numpy(zero_copy_only=False)]] = True
    return pa.array(out)

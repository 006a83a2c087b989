"""LlamaIndex ``MetadataFilters`` as Qdrant Edge ``Filter``s, with ``QdrantVectorStore``'s semantics.

Used by ``QdrantEdgeVectorStore``; kept apart because it is pure translation (no shard, no state).
"""

from __future__ import annotations

import uuid
from typing import Any

import qdrant_edge as qe
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)
from llama_index.core.vector_stores.utils import DEFAULT_DOC_ID_KEY

EDGE_POINT_NAMESPACE = uuid.UUID("6f1f3a52-8d0e-5c53-9a47-2b1c0e6d7f10")
"""Namespace of the uuid5 point ids made from node ids that are not UUIDs. Changing it orphans existing shards."""


def edge_point_id(node_id: str) -> str:
    """The point id a node is stored under: the node id itself when it is a UUID, else its uuid5."""
    try:
        return str(uuid.UUID(node_id))
    except ValueError:
        return str(uuid.uuid5(EDGE_POINT_NAMESPACE, node_id))


# -- filters ----------------------------------------------------------------------------------------------------


def doc_id_filter(doc_ids: list[str]) -> qe.Filter:
    return qe.Filter(must=[qe.FieldCondition(key=DEFAULT_DOC_ID_KEY, match=qe.MatchAny(list(doc_ids)))])


def query_filter(query: VectorStoreQuery) -> qe.Filter | None:
    must: list[Any] = []
    should: list[Any] = []
    must_not: list[Any] = []
    if query.doc_ids:
        must.append(qe.FieldCondition(key=DEFAULT_DOC_ID_KEY, match=qe.MatchAny(list(query.doc_ids))))
    if query.node_ids:
        must.append(qe.HasIdCondition({edge_point_id(n) for n in query.node_ids}))
    if query.filters is not None and query.filters.filters:
        more_must, should, more_must_not = _clauses(query.filters)
        must += more_must
        must_not += more_must_not
    if not (must or should or must_not):
        return None
    return qe.Filter(must=must or None, should=should or None, must_not=must_not or None)


def metadata_filters_to_edge(filters: MetadataFilters) -> qe.Filter:
    """Translate LlamaIndex MetadataFilters into an Edge ``Filter``, with ``QdrantVectorStore``'s semantics.

    EQ, NE, IN, NIN, GT, GTE, LT, LTE (a string value is a time: a datetime range), TEXT_MATCH, IS_EMPTY;
    nested MetadataFilters; AND → must, OR → should,
    NOT → must_not. NE and NIN use Qdrant's ``except`` match, which (in the Qdrant engine) also matches points
    that lack the key.

    AND and NOT groups nested in an AND are spliced into the outer filter rather than nested as sub-filters:
    Qdrant's planner uses payload indexes only for top-level conditions, and a nested ``Filter`` made an
    indexed event_type match twice as slow as the same match at the top level (slower than no filter at all).
    """
    must, should, must_not = _clauses(filters)
    return qe.Filter(must=must or None, should=should or None, must_not=must_not or None)


def _clauses(filters: MetadataFilters) -> tuple[list[Any], list[Any], list[Any]]:
    """(must, should, must_not) condition lists of one MetadataFilters group."""
    condition = filters.condition or FilterCondition.AND
    conditions: list[Any] = []
    spliced_must: list[Any] = []
    spliced_must_not: list[Any] = []
    for item in filters.filters:
        if isinstance(item, MetadataFilters):
            if not item.filters:
                continue
            inner = item.condition or FilterCondition.AND
            if condition == FilterCondition.AND and inner in (FilterCondition.AND, FilterCondition.NOT):
                inner_must, _, inner_must_not = _clauses(item)
                spliced_must += inner_must
                spliced_must_not += inner_must_not
            else:
                conditions.append(metadata_filters_to_edge(item))
            continue
        conditions.append(_condition(item))
    if condition == FilterCondition.AND:
        return spliced_must + conditions, [], spliced_must_not
    if condition == FilterCondition.OR:
        return [], conditions, []
    if condition == FilterCondition.NOT:
        return [], [], conditions
    raise NotImplementedError(f"filter condition {condition} is not supported")


def _condition(item: MetadataFilter) -> Any:
    key, value, op = item.key, item.value, item.operator or FilterOperator.EQ
    if op == FilterOperator.EQ:
        if isinstance(value, float):
            return qe.FieldCondition(key=key, range=qe.RangeFloat(gte=value, lte=value))
        return qe.FieldCondition(key=key, match=qe.MatchValue(_scalar(key, value)))
    if op == FilterOperator.NE:
        return qe.FieldCondition(key=key, match=qe.MatchExcept([_scalar(key, value)]))
    if op == FilterOperator.IN:
        return qe.FieldCondition(key=key, match=qe.MatchAny(_values(key, value)))
    if op == FilterOperator.NIN:
        return qe.FieldCondition(key=key, match=qe.MatchExcept(_values(key, value)))
    if op in _RANGES:
        if isinstance(value, str):  # an RFC 3339 time: served by a datetime index
            return qe.FieldCondition(key=key, range=qe.RangeDateTime(**{_RANGES[op]: value}))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"filter {key} {op.value} needs a number or an RFC 3339 time, got {value!r}")
        return qe.FieldCondition(key=key, range=qe.RangeFloat(**{_RANGES[op]: float(value)}))
    if op in (FilterOperator.TEXT_MATCH, FilterOperator.TEXT_MATCH_INSENSITIVE):
        return qe.FieldCondition(key=key, match=qe.MatchText(str(value)))
    if op == FilterOperator.IS_EMPTY:
        return qe.IsEmptyCondition(key)
    raise NotImplementedError(
        f"filter operator {op.value} is not supported by QdrantEdgeVectorStore "
        "(supported: EQ, NE, IN, NIN, GT, GTE, LT, LTE, TEXT_MATCH, IS_EMPTY)"
    )


_RANGES = {
    FilterOperator.GT: "gt",
    FilterOperator.GTE: "gte",
    FilterOperator.LT: "lt",
    FilterOperator.LTE: "lte",
}


def _scalar(key: str, value: Any) -> str | int:
    if isinstance(value, (str, int)):
        return value
    raise ValueError(f"filter {key}: match needs a string or an integer, got {value!r}")


def _values(key: str, value: Any) -> list[str] | list[int]:
    # A comma-separated string is accepted, as QdrantVectorStore does.
    values = value if isinstance(value, list) else str(value).split(",")
    if all(isinstance(v, str) for v in values) or all(isinstance(v, int) for v in values):
        return list(values)
    raise ValueError(f"filter {key}: in/nin need all strings or all integers, got {value!r}")

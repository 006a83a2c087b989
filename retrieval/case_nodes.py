"""Adjudicated cases as LlamaIndex nodes: what both backends store for a case, and back.

The node's text is the case's display ``summary`` (outcome included); its metadata carries the case fields, the
event's free text and its ``narrative`` (``retrieval.narrative``: the outcome-free text its narrative vector was
embedded from). Features, free text and narrative are kept out of the text an LLM or embedder gets from the node:
the features are long and numeric, the narrative repeats the summary, and free text reaches a prompt only through
the reasoner's own quoting.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from llama_index.core.schema import BaseNode, NodeRelationship, RelatedNodeInfo, TextNode

from retrieval.narrative import event_narrative
from riskcascade.core.domain import AdjudicatedCase, Entities, EventType, Outcome

CASE_NAMESPACE = uuid.UUID("0b5c1d7e-3f55-5a8e-b1a4-6c2d9e8f7a31")
"""Namespace of case node ids (uuid5 of the case id). Changing it orphans every existing index."""

CASE_PAYLOAD_VERSION = 2
"""Layout of a case's payload. An index written with an older layout must be rebuilt (2 added ``label_known_at``:
without it every case of an old index is left out of time-bounded retrieval)."""

ENTITY_FIELDS = ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id")
OCCURRED_AT = "occurred_at"  # RFC 3339, UTC for zone-aware times: equal instants are equal strings
LABEL_KNOWN_AT = "label_known_at"  # when the outcome became known; stored like OCCURRED_AT, null when unknown
NARRATIVE_KEY = "narrative"
TEXT_KEY = "free_text"  # not "text", the key of node text in QdrantVectorStore's legacy payloads
_NOT_FOR_PROMPTS = ["features", NARRATIVE_KEY, TEXT_KEY]


def case_node_id(case_id: str) -> str:
    """The node id (and Qdrant point id, in both backends) of a case: uuid5 of its case id.

    Qdrant accepts only unsigned integers and UUIDs as point ids and ``QdrantVectorStore`` uses the node id as the
    point id, so the case id itself (``case-00042``) cannot be the node id; it is kept in the metadata and as the
    node's source document (``ref_doc_id``), so ``vector_store.delete(case_id)`` removes a case in both backends.
    """
    return str(uuid.uuid5(CASE_NAMESPACE, case_id))


def case_narrative(case: AdjudicatedCase) -> str:
    """The outcome-free text a case's narrative vector is embedded from."""
    return event_narrative(case.event_type, case.features, case.text)


def case_to_node(case: AdjudicatedCase, embedding: Sequence[float], narrative: str | None = None) -> TextNode:
    """The node stored for a case: its summary as text, its behaviour vector, the rest as metadata.

    Non-finite feature values are stored as null (JSON has no NaN) and come back as NaN. ``narrative`` defaults to
    ``case_narrative(case)``.
    """
    entities = case.entities
    metadata: dict[str, Any] = {
        "case_id": case.case_id,
        "event_type": case.event_type.value,
        "outcome": case.outcome.value,
        "risk_type": case.risk_type,
        **{name: (getattr(entities, name) if entities is not None else None) for name in ENTITY_FIELDS},
        OCCURRED_AT: stored_time(case.occurred_at),
        LABEL_KNOWN_AT: stored_time(case.label_known_at),
        "features": {
            name: (float(value) if value is not None and math.isfinite(value) else None)
            for name, value in case.features.items()
        },
        TEXT_KEY: dict(case.text),
        NARRATIVE_KEY: case_narrative(case) if narrative is None else narrative,
    }
    return TextNode(
        id_=case_node_id(case.case_id),
        text=case.summary,
        embedding=[float(x) for x in embedding],
        metadata=metadata,
        excluded_embed_metadata_keys=list(_NOT_FOR_PROMPTS),
        excluded_llm_metadata_keys=list(_NOT_FOR_PROMPTS),
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=case.case_id)},
    )


def node_to_case(node: BaseNode) -> AdjudicatedCase:
    """Rebuild the case a node was made from (``case_to_node``'s inverse)."""
    meta = node.metadata
    entities = None
    if meta.get("account_id") is not None:
        entities = Entities(**{name: meta.get(name) or "" for name in ENTITY_FIELDS})
    occurred_at = meta.get(OCCURRED_AT)
    label_known_at = meta.get(LABEL_KNOWN_AT)  # absent from payloads written before it was stored: unknown
    return AdjudicatedCase(
        case_id=meta["case_id"],
        event_type=EventType(meta["event_type"]),
        features={k: (math.nan if v is None else float(v)) for k, v in (meta.get("features") or {}).items()},
        outcome=Outcome(meta["outcome"]),
        risk_type=meta.get("risk_type") or "",
        entities=entities,
        occurred_at=datetime.fromisoformat(occurred_at) if occurred_at else None,
        summary=node.get_content(),
        text={str(k): str(v) for k, v in (meta.get(TEXT_KEY) or {}).items()},
        label_known_at=datetime.fromisoformat(label_known_at) if label_known_at else None,
    )


def stored_time(moment: datetime | None) -> str | None:
    """How ``occurred_at`` and ``label_known_at`` are stored: RFC 3339, zone-aware times in UTC (a naive time is
    read as UTC by Qdrant).

    One instant is then one string, so "same time" can be matched as a keyword on either backend.
    """
    if moment is None:
        return None
    if moment.utcoffset() is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.isoformat()


def time_order_key(moment: datetime) -> datetime:
    """``moment`` made comparable with any other: a naive time is read as UTC, as Qdrant orders it."""
    return moment if moment.utcoffset() is not None else moment.replace(tzinfo=timezone.utc)

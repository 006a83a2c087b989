"""Policy documents (``retrieval/policies/*.md``): parsed, validated and cut into retrievable chunks.

A document is YAML front matter (``policy_id``, ``risk_type``, ``version``, ``title``, ``allowed_actions``) and
Markdown with ``##`` sections; decision rules are list items starting with a bold id (``- **ATO-3** ...``). See
``retrieval/policies/README.md`` for the format, ``tests/test_policy_documents.py`` for the content checks.

A chunk is one ``##`` section (the text before the first section is the "Overview" chunk). A section longer than
the embedder reads (MiniLM: 256 tokens, [CLS] and [SEP] included) is split at list-item and paragraph boundaries
into parts of about equal size, so no part is truncated when embedded. On the shipped policies 8 of the 25
sections need two parts (Thresholds sections run to ~450 tokens): 38 chunks with the five overviews.
"""

from __future__ import annotations

import datetime
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FRONT_MATTER_KEYS = ("policy_id", "risk_type", "version", "title", "allowed_actions")
ACTIONS_BY_SEVERITY = ("APPROVE", "REVIEW", "BLOCK")
OVERVIEW_SECTION = "Overview"  # the text between the front matter and the first ``##`` heading
README = "README.md"  # the folder's description, not a policy

FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
POLICY_ID = re.compile(r"^POL-([A-Z]+)$")
SECTION_HEADING = re.compile(r"^## (.+)$", re.M)
TITLE_HEADING = re.compile(r"^# .*$", re.M)
RULE_DEFINITION = re.compile(r"^- \*\*([A-Z]+-\d+)\*\* ")
BOLD_RULE_ID = re.compile(r"\*\*([A-Z]+-\d+)\*\*")


class PolicyFormatError(ValueError):
    """A policy file is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Rule:
    rule_id: str
    section: str
    text: str  # the whole list item, continuation lines joined


@dataclass(frozen=True)
class PolicyDocument:
    path: Path
    front: dict[str, Any]  # the front matter as YAML gave it (``version`` may be a date)
    body: str  # everything after the front matter
    sections: dict[str, str]  # heading -> text under it, up to the next ``##``
    rules: tuple[Rule, ...]

    @property
    def policy_id(self) -> str:
        return str(self.front["policy_id"])

    @property
    def short(self) -> str:
        """The rule id prefix: ``ATO`` for ``POL-ATO`` ("" when the id is malformed)."""
        match = POLICY_ID.match(str(self.front.get("policy_id", "")))
        return match.group(1) if match else ""

    @property
    def risk_type(self) -> str:
        return str(self.front["risk_type"])

    @property
    def version(self) -> str:
        return str(self.front["version"])

    @property
    def title(self) -> str:
        return str(self.front["title"])

    @property
    def allowed_actions(self) -> tuple[str, ...]:
        return tuple(self.front["allowed_actions"])

    @property
    def overview(self) -> str:
        """The text before the first section, without the ``#`` title line."""
        first = SECTION_HEADING.search(self.body)
        return TITLE_HEADING.sub("", self.body[: first.start() if first else len(self.body)]).strip()


# -- parsing ----------------------------------------------------------------------------------------------------


def list_items(section_text: str) -> list[str]:
    """Markdown list items, each with its indented continuation lines joined by spaces."""
    items: list[str] = []
    in_item = False
    for line in section_text.splitlines():
        if line.startswith("- "):
            items.append(line)
            in_item = True
        elif in_item and line.startswith("  ") and line.strip():
            items[-1] += " " + line.strip()
        else:
            in_item = False  # a blank or unindented line ends the item
    return items


def parse_policy_text(text: str, path: Path) -> PolicyDocument:
    """Parse one document's text; ``path`` is where it came from (for messages and ``PolicyDocument.path``)."""
    match = FRONT_MATTER.match(text)
    if match is None:
        raise PolicyFormatError(f"{path.name}: does not start with a '---' YAML front matter block")
    try:
        front = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise PolicyFormatError(f"{path.name}: front matter is not valid YAML: {exc}") from None
    if not isinstance(front, dict):
        raise PolicyFormatError(f"{path.name}: front matter is not a mapping")
    _check_front(front, path)
    body = text[match.end() :]
    headings = list(SECTION_HEADING.finditer(body))
    if not headings:
        raise PolicyFormatError(f"{path.name}: has no '## ' sections")
    sections: dict[str, str] = {}
    for i, heading in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(body)
        name = heading.group(1).strip()
        if name in sections or name == OVERVIEW_SECTION:
            raise PolicyFormatError(f"{path.name}: section '## {name}' appears twice or is reserved")
        sections[name] = body[heading.end() : end]
    rules = tuple(
        Rule(m.group(1), name, item)
        for name, section_text in sections.items()
        for item in list_items(section_text)
        if (m := RULE_DEFINITION.match(item))
    )
    return PolicyDocument(path, front, body, sections, rules)


def parse_policy(path: Path) -> PolicyDocument:
    """Read and parse one policy file; ``PolicyFormatError`` names the file and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFormatError(f"{path.name}: not UTF-8 text ({exc})") from None
    return parse_policy_text(text, path)


def load_policy_documents(policy_dir: Path) -> list[PolicyDocument]:
    """Every policy in ``policy_dir`` (``*.md`` but README.md), in file name order.

    Raises ``FileNotFoundError`` for a missing or empty folder and ``PolicyFormatError`` for a malformed file or
    two files with the same ``policy_id`` or ``risk_type``.
    """
    policy_dir = Path(policy_dir)
    if not policy_dir.is_dir():
        raise FileNotFoundError(f"no policy folder at {policy_dir} (retrieval.policy_dir)")
    paths = policy_file_paths(policy_dir)
    if not paths:
        raise FileNotFoundError(f"no policy documents (*.md) in {policy_dir} (retrieval.policy_dir)")
    documents = [parse_policy(p) for p in paths]
    for key in ("policy_id", "risk_type"):
        seen: dict[str, str] = {}
        for doc in documents:
            value = str(doc.front[key])
            if value in seen:
                raise PolicyFormatError(f"{doc.path.name}: {key} {value!r} is also used by {seen[value]}")
            seen[value] = doc.path.name
    return documents


def policy_file_paths(policy_dir: Path) -> list[Path]:
    """The policy files of a folder, in name order."""
    return sorted(p for p in Path(policy_dir).glob("*.md") if p.name != README)


def _check_front(front: dict[str, Any], path: Path) -> None:
    missing = [k for k in FRONT_MATTER_KEYS if k not in front]
    if missing:
        raise PolicyFormatError(f"{path.name}: front matter lacks {', '.join(missing)}")
    unknown = sorted(set(map(str, front)) - set(FRONT_MATTER_KEYS))
    if unknown:
        raise PolicyFormatError(f"{path.name}: front matter has unknown keys {', '.join(unknown)}")
    if not POLICY_ID.match(str(front["policy_id"])):
        raise PolicyFormatError(f"{path.name}: policy_id {front['policy_id']!r} is not POL-<CAPITAL LETTERS>")
    for key in ("risk_type", "title"):
        if not isinstance(front[key], str) or not front[key].strip():
            raise PolicyFormatError(f"{path.name}: {key} must be a non-empty string")
    if not isinstance(front["version"], (str, datetime.date)):
        raise PolicyFormatError(f"{path.name}: version {front['version']!r} is not a YYYY-MM-DD date")
    actions = front["allowed_actions"]
    if not isinstance(actions, list) or not actions or not set(actions) <= set(ACTIONS_BY_SEVERITY):
        raise PolicyFormatError(
            f"{path.name}: allowed_actions must be a non-empty list of {', '.join(ACTIONS_BY_SEVERITY)}, "
            f"not {actions!r}"
        )


# -- chunking ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyChunk:
    """One retrievable piece of a policy: a section, or a part of a long one. Its fields are its payload."""

    chunk_id: str  # stable: POL-ATO#thresholds-1
    policy_id: str
    risk_type: str
    version: str
    title: str
    section: str
    part: int  # 1-based part of the section
    rule_ids: tuple[str, ...]  # rules defined (bold ids) in this chunk, in order
    allowed_actions: tuple[str, ...]
    text: str
    source: str  # file name of the document

    @property
    def embedding_text(self) -> str:
        """What is embedded: the policy title and section name give a part of a section its context."""
        return embedding_text(self.title, self.section, self.text)


def embedding_text(title: str, section: str, text: str) -> str:
    return f"{title}: {section}\n{text}"


@dataclass(frozen=True)
class TokenBudget:
    """How a text embedder counts tokens, and how many it reads."""

    count: Callable[[str], int]  # tokens of a text, untruncated, [CLS] and [SEP] included
    max_tokens: int

    @classmethod
    def of_artifact(cls, embedding_dir: Path) -> TokenBudget:
        """The budget of the exported embedder in ``embedding_dir`` (its tokenizer and max_length)."""
        return _artifact_budget(Path(embedding_dir).resolve())


@functools.lru_cache(maxsize=4)
def _artifact_budget(embedding_dir: Path) -> TokenBudget:
    from tokenizers import Tokenizer

    from retrieval.embedding import EmbeddingManifest

    manifest = EmbeddingManifest.load(embedding_dir)
    tokenizer = Tokenizer.from_file(str(embedding_dir / manifest.tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return TokenBudget(lambda text: len(tokenizer.encode(text).ids), manifest.max_length)


def chunk_policy(doc: PolicyDocument, budget: TokenBudget | None = None) -> list[PolicyChunk]:
    """The document's chunks in reading order: the overview, then each section (split when over ``budget``).

    ``budget`` defaults to the exported embedder's (``var/embedding``). Chunk ids depend only on the text and the
    budget, so re-chunking an unchanged document gives the same ids.
    """
    budget = budget if budget is not None else TokenBudget.of_artifact(_default_embedding_dir())
    sections = ([(OVERVIEW_SECTION, doc.overview)] if doc.overview else []) + [
        (name, text.strip()) for name, text in doc.sections.items()
    ]
    chunks = []
    for section, text in sections:
        parts = _split(text, lambda candidate, s=section: budget.count(embedding_text(doc.title, s, candidate)),
                       budget.max_tokens)
        for number, part in enumerate(parts, start=1):
            chunks.append(
                PolicyChunk(
                    chunk_id=f"{doc.policy_id}#{_slug(section)}-{number}",
                    policy_id=doc.policy_id,
                    risk_type=doc.risk_type,
                    version=doc.version,
                    title=doc.title,
                    section=section,
                    part=number,
                    rule_ids=tuple(dict.fromkeys(BOLD_RULE_ID.findall(part))),
                    allowed_actions=doc.allowed_actions,
                    text=part,
                    source=doc.path.name,
                )
            )
    return chunks


def _split(text: str, tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """``text`` cut at block boundaries into as few parts under ``max_tokens`` as greedy packing allows, the
    largest part as small as it can be (so the parts are of about equal size).

    A block (a paragraph, or a list item with its continuation lines) is never cut: one longer than the budget
    becomes a part of its own and the embedder truncates it.
    """
    total = tokens(text)
    if total < max_tokens:
        return [text]
    blocks = _blocks(text)
    fewest = _pack(blocks, tokens, max_tokens - 1)
    # Greedy packing gives no more parts for a larger cap: find the smallest cap that keeps the fewest parts.
    low, high = math.ceil(total / len(fewest)), max_tokens - 1
    while low < high:
        middle = (low + high) // 2
        if len(_pack(blocks, tokens, middle)) <= len(fewest):
            high = middle
        else:
            low = middle + 1
    return [_join(part) for part in _pack(blocks, tokens, low)]


def _pack(blocks: list[str], tokens: Callable[[str], int], cap: int) -> list[list[str]]:
    """Blocks in order into parts of at most ``cap`` tokens, each part filled before the next starts."""
    parts: list[list[str]] = [[]]
    for block in blocks:
        candidate = parts[-1] + [block]
        if parts[-1] and tokens(_join(candidate)) > cap:
            parts.append([block])
        else:
            parts[-1] = candidate
    return parts


def _join(blocks: list[str]) -> str:
    """Blocks back into Markdown: list items on consecutive lines, a blank line around paragraphs."""
    text = blocks[0]
    for before, block in zip(blocks, blocks[1:]):
        text += ("\n" if before.startswith("- ") and block.startswith("- ") else "\n\n") + block
    return text


def _blocks(text: str) -> list[str]:
    """Paragraphs and list items (with their continuation lines), in order, as written."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            blocks.append([])  # a blank line ends a block
        elif line.startswith("- ") or not blocks or not blocks[-1]:
            blocks.append([line])
        else:
            blocks[-1].append(line)
    return ["\n".join(b) for b in blocks if b]


def _slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _default_embedding_dir() -> Path:
    from retrieval.embedding import EMBEDDING_DIR

    return EMBEDDING_DIR

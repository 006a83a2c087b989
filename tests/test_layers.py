"""The house runs one way: each package imports only the layers below it (README, "Architecture").

Every ``import`` counts, wherever it stands: at module level, inside a function (a lazy import still runs the other
way when it runs), and under ``if TYPE_CHECKING:``. The gateway test goes further than the graph: it imports every
orchestrator module in a fresh interpreter and looks at what got loaded, and it looks at the memory map of the
running orchestrator process, so a replica library pulled in by set-up work or by a third party counts too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("riskcascade", "orchestrator", "services", "retrieval", "loadtest")
FIRST_PARTY = (*PACKAGES, "risk")

# Layer of a module: the longest prefix below that names it. What a layer may import: itself and these.
LAYERS = {
    "riskcascade.core": "core",
    "retrieval": "retrieval",
    "riskcascade.modelling": "modelling",
    "services": "services",
    "orchestrator": "orchestrator",
    "risk": "wire",  # the generated protobuf/gRPC modules
    "riskcascade": "commands",  # riskcascade.cli, .evaluate_cascade, .backtest, .drift_report, .dev_secrets
    "loadtest": "commands",
}
MAY_IMPORT = {
    "core": set(),
    "wire": set(),
    "retrieval": {"core"},
    "modelling": {"core", "retrieval"},
    "services": {"core", "retrieval", "modelling"},
    "orchestrator": {"core", "wire"},
    "commands": {"core", "wire", "retrieval", "modelling", "services", "orchestrator"},
}
# What the gateway process must never load: the replicas' model runtimes and the replica packages themselves.
REPLICA_ONLY = ("lightgbm", "onnxruntime", "numba", "sklearn", "llama_index", "qdrant_edge", "tokenizers", "services")
REPLICA_LIBRARIES = ("lib_lightgbm", "onnxruntime_pybind11", "numba/_helperlib", "llvmlite", "qdrant_edge")


def layer_of(module: str) -> str | None:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")),
               key=len, default=None)
    return LAYERS[best] if best else None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file; relative ones resolved, and ``from pkg import mod``
    named by the submodule it loads (a name inside a module is named by the module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                parts = package.split(".")
                target = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            for alias in node.names:
                found.add((node.lineno, f"{target}.{alias.name}" if _is_module(root, f"{target}.{alias.name}")
                           else target))
    return sorted(found)


def _is_module(root: Path, dotted: str) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def wrong_way_imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every import that runs against the layers, as 'file:line: importer (layer) -> imported (layer)'."""
    problems = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(root, path)
            own = layer_of(importer)
            for line, imported in imports_of(root, path, importer):
                if imported.split(".")[0] not in FIRST_PARTY:
                    continue
                theirs = layer_of(imported)
                if theirs is None or theirs == own or theirs in MAY_IMPORT[own]:
                    continue
                problems.append(f"{path.relative_to(root)}:{line}: {importer} ({own}) -> {imported} ({theirs})")
    return problems


def test_every_import_runs_down_the_layers():
    assert wrong_way_imports(REPO) == []


def test_every_module_has_a_layer():
    unplaced = [module_name(REPO, p) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                if layer_of(module_name(REPO, p)) is None]
    assert unplaced == []


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        # the core reaching into modelling, even lazily inside a function
        ("riskcascade/core/features.py", "def f():\n    from riskcascade.modelling.datasets import format\n",
         "riskcascade.core.features (core) -> riskcascade.modelling.datasets.format (modelling)"),
        # the gateway importing replica code for one type (what issue 18 found)
        ("orchestrator/stages.py", "from services.scorer.fast_model import ScorerInfo\n",
         "orchestrator.stages (orchestrator) -> services.scorer.fast_model (services)"),
        # retrieval reaching up, under TYPE_CHECKING
        ("retrieval/narrative.py",
         "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import orchestrator.cascade\n",
         "retrieval.narrative (retrieval) -> orchestrator.cascade (orchestrator)"),
        # a relative import resolved to its package
        ("services/scorer/deployment.py", "from ...orchestrator import batching\n",
         "services.scorer.deployment (services) -> orchestrator.batching (orchestrator)"),
        # the core speaking protobuf
        ("riskcascade/core/domain.py", "from risk.v1 import decision_pb2\n",
         "riskcascade.core.domain (core) -> risk.v1.decision_pb2 (wire)"),
    ],
)
def test_the_check_finds_an_import_that_runs_the_wrong_way(tmp_path, where, source, expected):
    for package in ("riskcascade/core", "riskcascade/modelling/datasets", "orchestrator", "services/scorer",
                    "retrieval", "risk/v1"):
        for level in range(1, len(Path(package).parts) + 1):
            folder = tmp_path.joinpath(*Path(package).parts[:level])
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").touch()
    for name in ("orchestrator/batching.py", "orchestrator/cascade.py", "services/scorer/fast_model.py",
                 "riskcascade/modelling/datasets/format.py", "risk/v1/decision_pb2.py"):
        (tmp_path / name).touch()
    (tmp_path / where).write_text(source)
    problems = wrong_way_imports(tmp_path, ("riskcascade", "orchestrator", "services", "retrieval"))
    assert len(problems) == 1 and problems[0].startswith(f"{where}:") and problems[0].endswith(expected), problems


def test_importing_the_gateway_loads_no_replica_runtime():
    """Every orchestrator module, imported in a fresh interpreter: none of the replicas' libraries comes with it."""
    probe = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys
        import orchestrator
        for info in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
            importlib.import_module(info.name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {REPLICA_ONLY!r})
        print(json.dumps({{"modules": sorted(m for m in sys.modules if m.startswith("orchestrator.")),
                          "replica": loaded}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"orchestrator.server", "orchestrator.servicer", "orchestrator.stages", "orchestrator.platform"} <= set(
        result["modules"])
    assert result["replica"] == []


@pytest.mark.slow
def test_the_running_orchestrator_process_holds_no_replica_library(platform):
    """The orchestrator process as ``riskcascade up`` leaves it: set-up (train, index, seed the state) ran in a
    child process, so no model runtime is mapped into the gateway."""
    maps = Path(f"/proc/{platform.process.pid}/maps")  # `riskcascade up` serves in its own process
    if not maps.exists():
        pytest.skip("no /proc/<pid>/maps on this system")
    mapped = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
    assert any("grpc" in path for path in mapped), "the map should show the gateway's own libraries"
    assert sorted(p for p in mapped if any(lib in p for lib in REPLICA_LIBRARIES)) == []


# Module-level numbers that are not settings, each with why. A new number in a module is either added here with a
# reason of this kind, or it is a setting and belongs in riskcascade.core.config (one typed config for every knob).
NOT_SETTINGS = {
    "riskcascade/core/calibration.py": {"_EPS": "numeric guard of the logit"},
    "riskcascade/core/entity_state.py": {
        "SECONDS_PER_HOUR": "unit", "SUM_WINDOWS": "feature definition (windows with sums), part of the layout",
        "_INITIAL_CAPACITY": "array growth detail"},
    "riskcascade/core/state_redis.py": {"_ID_BYTES": "key format (digest length in a history member)"},
    "riskcascade/core/thresholds.py": {"BAND_CENTRE": "score scale", "SCORE_FLOOR": "score scale",
                                       "SCORE_CEILING": "score scale"},
    "riskcascade/backtest.py": {"PER_DECISIONS": "unit: costs are reported per 1,000 decisions"},
    "riskcascade/dev_secrets.py": {"PRIVATE_FILE_MODE": "file permission", "PRIVATE_DIR_MODE": "file permission",
                                   "TOKEN_BYTES": "token strength of development material"},
    "riskcascade/modelling/anomaly.py": {"PROBE_ROWS": "self-check at load (compiled vs ONNX)",
                                         "_LEAF": "ONNX graph encoding", "_TERM_TABLE_ROWS": "kernel table size"},
    "riskcascade/modelling/datasets/format.py": {"UNLABELLED": "format: label of an unlabelled row",
                                                 "SECONDS_PER_HOUR": "unit"},
    "riskcascade/modelling/evaluation.py": {
        "RISK_TYPE_RECALL_FPR": "metric definition, named in reports", "FIGURE_SIZE_IN": "presentation",
        "FIGURE_DPI": "presentation", "CALIBRATION_HEIGHT_RATIOS": "presentation", "HISTOGRAM_BINS": "presentation",
        "SPLIT_LINE_ALPHA": "presentation", "HISTOGRAM_ALPHA": "presentation", "BAND_ALPHA": "presentation"},
    "riskcascade/modelling/model_metrics.py": {"DEFAULT_ECE_BINS": "metric definition, named in reports"},
    "riskcascade/modelling/text_model.py": {"TEXT_MODEL_FORMAT": "file format version of text_model.json"},
    "riskcascade/modelling/training.py": {"ONNX_TARGET_OPSET": "what onnxmltools 1.16 converts LightGBM for",
                                          "STD_FLOOR": "numeric guard"},
    "orchestrator/store.py": {"_MAX_QUERY_PARAMETERS": "SQLite's bound-parameter limit",
                              "_SCHEMA_LOCK_KEY": "identity: the advisory lock's name"},
    "orchestrator/validation.py": {"MAX_NANOS": "protobuf Timestamp range"},
    "services/reasoning/evidence_weighing.py": {"PROBABILITY_FLOOR": "numeric guard of the log-odds"},
    "services/reasoning/schema.py": {"RATIONALE_MAX_CHARS": "verdict schema every backend is held to",
                                     "MAX_CITATIONS": "verdict schema every backend is held to"},
    "services/scorer/explain.py": {"_CATEGORICAL_MASK": "LightGBM model format",
                                   "_DEFAULT_LEFT_MASK": "LightGBM model format"},
    "retrieval/case_memory.py": {"TIE_LOOKAHEAD": "search algorithm (ties at the cut-off)",
                                 "MAX_TIE_LOOKAHEAD": "search algorithm (ties at the cut-off)"},
    "retrieval/case_nodes.py": {"CASE_PAYLOAD_VERSION": "format version, part of the index identity"},
    "retrieval/edge_store.py": {"_SCROLL_PAGE": "paging detail of the adapter"},
    "retrieval/qdrant_store.py": {"_SCROLL_PAGE": "paging detail of the adapter"},
    "retrieval/embedding.py": {"MANIFEST_FORMAT": "format version"},
    "retrieval/embedding_export.py": {
        "MANIFEST_FORMAT": "format version", "OPSET": "export target of the embedding model",
        "PARITY_FLOOR": "acceptance bar of the export, recorded in its manifest",
        "BATCH_CONSISTENCY_FLOOR": "acceptance bar of the export, recorded in its manifest"},
    "retrieval/narrative.py": {
        "NARRATIVE_VERSION": "format version, part of the index identity",
        "SIGNIFICANT_DIGITS": "narrative wording (versioned by NARRATIVE_VERSION)",
        "SHARED_ENTITY_MIN_ACCOUNTS": "narrative wording (versioned by NARRATIVE_VERSION)",
        "TEXT_FIELD_MAX_CHARS": "narrative wording (versioned by NARRATIVE_VERSION)"},
    "retrieval/text_vectors.py": {"MANIFEST_DIGEST_CHARS": "identity format"},
}
# The synthetic generator's numbers are the simulated world it documents (riskcascade.modelling.synthetic): a
# different world is a different generator version, not a knob.
SIMULATED_WORLD = ("riskcascade/modelling/synthetic.py", "riskcascade/modelling/synthetic_fraud.py",
                   "riskcascade/modelling/synthetic_marketplace.py", "riskcascade/modelling/synthetic_notes.py",
                   "riskcascade/modelling/synthetic_messages.py")


def _is_number(value: ast.expr) -> bool:
    if isinstance(value, ast.Constant):
        return isinstance(value.value, (int, float)) and not isinstance(value.value, bool)
    if isinstance(value, ast.UnaryOp):
        return _is_number(value.operand)
    if isinstance(value, ast.BinOp):
        return _is_number(value.left) and _is_number(value.right)
    if isinstance(value, ast.Tuple):
        return bool(value.elts) and all(_is_number(e) for e in value.elts)
    return False


def module_numbers(root: Path, packages: tuple[str, ...] = ("riskcascade", "orchestrator", "services", "retrieval")
                   ) -> dict[str, set[str]]:
    """{file: names} of every module-level name bound to a number (or a tuple of numbers)."""
    found: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
                    node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None)
                if isinstance(target, ast.Name) and _is_number(node.value):
                    found.setdefault(str(path.relative_to(root)), set()).add(target.id)
    return found


def test_module_level_numbers_are_facts_not_settings():
    found = {f: names for f, names in module_numbers(REPO).items() if f not in SIMULATED_WORLD}
    unexplained = sorted(f"{f}: {n}" for f, names in found.items() for n in names - NOT_SETTINGS.get(f, {}).keys())
    assert unexplained == [], "a setting? move it into riskcascade.core.config; a fact? say why in NOT_SETTINGS"
    gone = sorted(f"{f}: {n}" for f, names in NOT_SETTINGS.items() for n in names if n not in found.get(f, set()))
    assert gone == [], "NOT_SETTINGS names something that no longer exists"


def test_the_number_check_finds_a_setting_left_in_code(tmp_path):
    (tmp_path / "orchestrator").mkdir()
    (tmp_path / "orchestrator" / "platform.py").write_text("import x\nAPP_POLL_S = 0.5\nNAME = 'a'\nLIMITS = (1, 2)\n")
    assert module_numbers(tmp_path, ("orchestrator",)) == {"orchestrator/platform.py": {"APP_POLL_S", "LIMITS"}}

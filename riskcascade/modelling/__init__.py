"""Modelling: data sets, the synthetic generator, training and the fast model's evaluation.

Imports ``riskcascade.core`` and ``retrieval`` (the synthetic generator words its cases the way retrieval embeds
them); never the orchestrator, the services, or the commands on top (``riskcascade.cli``,
``riskcascade.evaluate_cascade``). ``anomaly`` is here because training fits and exports the isolation forest; the
scorer replica imports it to run the compiled forest.
"""

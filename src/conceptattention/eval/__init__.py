"""Evaluation harness: datasets, protocol and metrics over many images.

``score_dataset(pipe, dataset, EvalConfig(dataset=...))`` (:mod:`.harness`) evaluates and summarises;
``conceptattention eval`` runs it with records, manifest and report (:mod:`.run`).
"""

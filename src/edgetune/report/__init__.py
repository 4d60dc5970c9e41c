"""Reports: `report.md` and PNG plots of a run directory.

render.py picks the report by the run's command: single.py (finetune, eval),
federated.py (federate, flower run), which adds pruned.py's sections for a run whose
devices train pruned sub-models (FedSpine), or compress.py (the stage table and Pareto
plots of a compress run).
run_info.py reads the run and writes what was run; plots.py draws; numbers.py rounds.
"""

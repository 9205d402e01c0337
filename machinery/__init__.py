"""The machinery around the algorithm: nothing in here is the algorithm.

One-line errors for bad input (errors), writes that appear whole or not at all (atomic), where the cache
and the data live (paths, fetch, embedded), which devices and dtype a run uses and how the layers are
spread over them (devices, placement), the memory plan from config.json alone (plan, memory), and the
state an interrupted run continues from (resume). The pipeline itself is in the files beside this folder:
load_weights, model, gates, teacher, search, excise, tune, quantize, eval.
"""

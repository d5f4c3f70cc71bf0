"""Jobs: lists of stages that pass typed artifacts, resumable through one checkpoint helper.

run        discover -> control -> generate -> measure -> report   (`steerscope run`)
sae        activations -> train -> save                          (`steerscope sae train`)
corpus     sample batches into a JSONL file                      (`steerscope sae corpus`)
"""

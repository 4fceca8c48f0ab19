"""The request lifecycle shared by the simulator and the real replay.

`records` (request record, model units), `storage` (node tiers), `worker` (one GPU's lifecycle),
`router` (the cluster and its routing), `device` (what the lifecycle asks of a GPU), `clock` (the
replay's wall clock), `run` (policies from a system, arrivals, end checks), `metrics` (tables and the
summary), `links` (fluid fair-share links of the modelled device). Pure Python over SimPy: no torch.
"""

"""Every prediction a measurement in partlab stands next to, from the model's sizes alone:

  comm.py      what each layout communicates per step, per collective, and on the wire
  compute.py   FLOPs per step
  memory.py    activation memory: the MLP and the gpt, tensor-parallel (with and without
               sequence parallelism) and pipeline ranks
  pipeline.py  the schedules' orders of actions, the bubble they leave for given per-stage costs
               (simulated) and for equal stages (closed forms), activations alive per rank
  step.py      a layout's memory and step time at any scale (`partlab plan`)

The lab's records, `partlab bench`, `partlab plan` and the tests all compare against these.
"""

"""Training over several devices and hosts with Keras' distribution API (JAX): the mesh a recipe asks
for (mesh.py), the layout of every variable (layouts.py), multi-host start-up, per-host data shards and
gathering for checkpoints (hosts.py), and setting it all up for a run (setup.py)."""

"""Training: the jitted step (`step`) and the loop around it (`loop`).

`step` holds the model's params, optimizer and train state, the mesh and
the jitted train and eval steps; evaluation and serving may use it.
`loop` holds epochs, validation, checkpoints and the run directory, and is
imported only by train.py.
"""

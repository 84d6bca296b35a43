"""Operating a cluster: starting or attaching to Ray, the capacity model, and the `doctor` stage."""

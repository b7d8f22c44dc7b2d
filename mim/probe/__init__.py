"""Probes of a representation on a small labeled set: k-NN (DINO) and a linear classifier, for
`mim knn` and the monitor of a pretraining run."""

"""NNI NAS adapter internals; the public names are in :mod:`nni_elastic.nni.nas`."""

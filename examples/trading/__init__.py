"""The demo's trading world: a synthetic market, three real scikit-learn models, their model servers and a
traffic generator. Used by `shadowgate demo` and the end-to-end tests; see examples/README.md."""

import os

# One OpenMP thread, decided before scikit-learn loads its OpenMP runtime (later is too late: limiting
# threads at run time left scikit-learn's trees many times slower here). A model server answers one
# small request at a time, where threads only add overhead, and the demo shares a small machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
